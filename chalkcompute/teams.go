package chalkcompute

import (
	"context"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// Teams: orgs, their members (a role each: admin, member, viewer), API keys
// (per user per org; the secret is returned once, at creation), quotas and
// the audit trail. Results are the API's messages.

// CreateOrg makes an org and its first admin (node admin only); the
// result carries a key for that admin (AdminKey.Secret, shown once).
func (c *Client) CreateOrg(ctx context.Context, name, admin string) (*v1.CreateOrgResponse, error) {
	resp, err := c.team.CreateOrg(ctx, connect.NewRequest(&v1.CreateOrgRequest{Name: name, Admin: admin}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// Orgs lists the caller's orgs (every org for the node admin).
func (c *Client) Orgs(ctx context.Context) ([]*v1.Org, error) {
	resp, err := c.team.ListOrgs(ctx, connect.NewRequest(&v1.ListOrgsRequest{}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Orgs, nil
}

// AddMember adds user (created if new) to org ("" = the caller's) with role;
// the result carries a first key for the user (Key.Secret, shown once).
func (c *Client) AddMember(ctx context.Context, org, user, role string) (*v1.AddMemberResponse, error) {
	resp, err := c.team.AddMember(ctx, connect.NewRequest(&v1.AddMemberRequest{Org: org, User: user, Role: role}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// Members lists an org's members ("" = the caller's org).
func (c *Client) Members(ctx context.Context, org string) ([]*v1.Member, error) {
	resp, err := c.team.ListMembers(ctx, connect.NewRequest(&v1.ListMembersRequest{Org: org}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Members, nil
}

// RemoveMember removes user from org ("" = the caller's) and revokes its keys there.
func (c *Client) RemoveMember(ctx context.Context, org, user string) error {
	_, err := c.team.RemoveMember(ctx, connect.NewRequest(&v1.RemoveMemberRequest{Org: org, User: user}))
	return err
}

// KeyOption configures CreateKey.
type KeyOption func(*v1.CreateKeyRequest)

// KeyRole scopes the key to role (at most the caller's).
func KeyRole(role string) KeyOption { return func(r *v1.CreateKeyRequest) { r.Role = role } }

// KeyTTL makes the key expire after d.
func KeyTTL(d time.Duration) KeyOption {
	return func(r *v1.CreateKeyRequest) { r.TtlSeconds = int64(d / time.Second) }
}

// KeyFor makes the key for another member of the org (admins).
func KeyFor(user string) KeyOption { return func(r *v1.CreateKeyRequest) { r.User = user } }

// CreateKey makes an API key in the caller's org; its Secret is shown only here.
func (c *Client) CreateKey(ctx context.Context, name string, opts ...KeyOption) (*v1.ApiKey, error) {
	req := &v1.CreateKeyRequest{Name: name}
	for _, o := range opts {
		o(req)
	}
	resp, err := c.team.CreateKey(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// Keys lists the caller's keys, or with all every member's (admins).
func (c *Client) Keys(ctx context.Context, all bool) ([]*v1.ApiKey, error) {
	resp, err := c.team.ListKeys(ctx, connect.NewRequest(&v1.ListKeysRequest{All: all}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Keys, nil
}

// RevokeKey revokes a key by id or prefix; it fails on its next use.
func (c *Client) RevokeKey(ctx context.Context, idOrPrefix string) (*v1.ApiKey, error) {
	resp, err := c.team.RevokeKey(ctx, connect.NewRequest(&v1.RevokeKeyRequest{Id: idOrPrefix}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Key, nil
}

// Quota returns an org's limits in force ("" = the caller's org).
func (c *Client) Quota(ctx context.Context, org string) (*v1.Quota, error) {
	resp, err := c.team.GetQuota(ctx, connect.NewRequest(&v1.GetQuotaRequest{Org: org}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// SetQuota sets an org's limits (node admin; 0 = the node's default).
func (c *Client) SetQuota(ctx context.Context, org string, q *v1.Quota) (*v1.Quota, error) {
	resp, err := c.team.SetQuota(ctx, connect.NewRequest(&v1.SetQuotaRequest{Org: org, Quota: q}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// Audit returns the caller's org's audit records, newest first (admins).
func (c *Client) Audit(ctx context.Context, q *v1.AuditRequest) ([]*v1.AuditRecord, error) {
	if q == nil {
		q = &v1.AuditRequest{}
	}
	resp, err := c.team.Audit(ctx, connect.NewRequest(q))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Records, nil
}

// SetMemberRole changes a member's role in org ("" = the caller's); its keys follow at once.
func (c *Client) SetMemberRole(ctx context.Context, org, user, role string) (*v1.Member, error) {
	resp, err := c.team.SetMemberRole(ctx, connect.NewRequest(&v1.SetMemberRoleRequest{Org: org, User: user, Role: role}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}
