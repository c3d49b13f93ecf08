package api

import (
	"context"
	"fmt"
	"math"
	"regexp"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// teamService manages orgs, members, API keys, quotas and the audit trail.
// Who may call what is in rules (authz.go); the handlers check what
// depends on the request's values (roles asked for, whose keys).
type teamService struct{ s *Server }

var _ computev1connect.TeamServiceHandler = (*teamService)(nil)

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

func validName(what, s string) error {
	if !nameRE.MatchString(s) {
		return invalid("%s %q: want a DNS label (lower-case letters, digits and '-', at most 63)", what, s)
	}
	return nil
}

// orgOf is the org a request names ("" = the caller's). authorize already
// refused another org unless the caller is the node admin.
func orgOf(p *Principal, org string) string {
	if org == "" {
		return p.OrgID
	}
	return org
}

// newAPIKey makes a key record and its secret.
func newAPIKey(org, user, name string, role store.Role, createdBy string, now time.Time, ttl time.Duration) (*store.APIKey, string) {
	secret, prefix, hash := NewKey()
	k := &store.APIKey{
		ID: newKeyID(), Hash: hash, Prefix: prefix, OrgID: org, User: user, Name: name, Role: role,
		CreatedBy: createdBy, CreatedAt: now,
	}
	if ttl > 0 {
		k.ExpiresAt = now.Add(ttl)
	}
	return k, secret
}

func keyProto(k *store.APIKey, secret string) *v1.ApiKey {
	return &v1.ApiKey{
		Id: k.ID, Prefix: k.Prefix, Name: k.Name, Org: k.OrgID, User: k.User, Role: string(k.Role),
		CreatedBy: k.CreatedBy, CreatedAt: ts(k.CreatedAt), ExpiresAt: ts(k.ExpiresAt),
		LastUsedAt: ts(k.LastUsedAt), RevokedAt: ts(k.RevokedAt), Secret: secret,
	}
}

func (h *teamService) orgProto(o *store.Org) *v1.Org {
	return &v1.Org{Name: o.Name, CreatedAt: ts(o.CreatedAt), Quota: quotaProto(o.Quota.Or(h.s.cfg.DefaultQuota))}
}

func quotaProto(q store.Quota) *v1.Quota {
	return &v1.Quota{MaxRunningSandboxes: int32(q.MaxRunning), MaxVcpu: q.MaxVCPU, MaxMemoryMb: q.MaxMemoryMB, MaxCreatesPerMinute: int32(q.MaxCreatesPerMinute),
		MaxUploadBytes: q.MaxUploadBytes}
}

// quotaWithUse is org's quota as GetQuota and SetQuota answer: with what
// its uploads are charged now.
func (s *Server) quotaWithUse(ctx context.Context, org string) (*v1.Quota, error) {
	q, err := s.quotaOf(ctx, org)
	if err != nil {
		return nil, err
	}
	out := quotaProto(q)
	if out.UploadBytes, err = s.store.OrgUploadBytes(ctx, org); err != nil {
		return nil, err
	}
	return out, nil
}

func (h *teamService) CreateOrg(ctx context.Context, req *connect.Request[v1.CreateOrgRequest]) (*connect.Response[v1.CreateOrgResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	name, adm := strings.TrimSpace(req.Msg.Name), strings.TrimSpace(req.Msg.Admin)
	if err := validName("org name", name); err != nil {
		return nil, err
	}
	if err := validName("admin user", adm); err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	key, secret := newAPIKey(name, adm, "first key", store.RoleAdmin, p.Subject, now, 0)
	org := store.Org{Name: name, CreatedAt: now}
	if err := h.s.store.CreateOrg(ctx, org, adm, false, key); err != nil {
		return nil, err
	}
	setAuditObject(ctx, "org:"+name)
	return connect.NewResponse(&v1.CreateOrgResponse{Org: h.orgProto(&org), AdminKey: keyProto(key, secret)}), nil
}

func (h *teamService) ListOrgs(ctx context.Context, _ *connect.Request[v1.ListOrgsRequest]) (*connect.Response[v1.ListOrgsResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	who := p.User
	if p.NodeAdmin {
		who = ""
	}
	orgs, err := h.s.store.ListOrgs(ctx, who)
	if err != nil {
		return nil, err
	}
	out := &v1.ListOrgsResponse{}
	for _, o := range orgs {
		out.Orgs = append(out.Orgs, h.orgProto(o))
	}
	return connect.NewResponse(out), nil
}

func (h *teamService) AddMember(ctx context.Context, req *connect.Request[v1.AddMemberRequest]) (*connect.Response[v1.AddMemberResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	org, name := orgOf(p, req.Msg.Org), strings.TrimSpace(req.Msg.User)
	if err := validName("user", name); err != nil {
		return nil, err
	}
	role, err := store.ParseRole(req.Msg.Role)
	if err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	m := store.Member{OrgID: org, User: name, Role: role, CreatedAt: now}
	key, secret := newAPIKey(org, name, "first key", role, p.Subject, now, 0)
	if err := h.s.store.AddMember(ctx, m, key); err != nil {
		return nil, err
	}
	setAuditObject(ctx, "member:"+org+"/"+name)
	return connect.NewResponse(&v1.AddMemberResponse{
		Member: &v1.Member{User: name, Role: string(role), CreatedAt: ts(now)}, Key: keyProto(key, secret),
	}), nil
}

func (h *teamService) ListMembers(ctx context.Context, req *connect.Request[v1.ListMembersRequest]) (*connect.Response[v1.ListMembersResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	ms, err := h.s.store.ListMembers(ctx, orgOf(p, req.Msg.Org))
	if err != nil {
		return nil, err
	}
	out := &v1.ListMembersResponse{}
	for _, m := range ms {
		out.Members = append(out.Members, &v1.Member{User: m.User, Role: string(m.Role), CreatedAt: ts(m.CreatedAt)})
	}
	return connect.NewResponse(out), nil
}

func (h *teamService) RemoveMember(ctx context.Context, req *connect.Request[v1.RemoveMemberRequest]) (*connect.Response[v1.RemoveMemberResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	org := orgOf(p, req.Msg.Org)
	setAuditObject(ctx, "member:"+org+"/"+req.Msg.User)
	if err := h.s.store.RemoveMember(ctx, org, req.Msg.User, time.Now().UTC()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.RemoveMemberResponse{}), nil
}

func (h *teamService) CreateKey(ctx context.Context, req *connect.Request[v1.CreateKeyRequest]) (*connect.Response[v1.ApiKey], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	r := req.Msg
	role := p.Role
	if r.Role != "" {
		if role, err = store.ParseRole(r.Role); err != nil {
			return nil, err
		}
	}
	if role.Rank() > p.Role.Rank() {
		return nil, fmt.Errorf("role %s: higher than the calling key's (%s); a key can only make keys of its role or lower: %w", role, p.Role, errdefs.ErrPermissionDenied)
	}
	who := p.User
	if r.User != "" && r.User != p.User {
		if p.Role != store.RoleAdmin {
			return nil, fmt.Errorf("keys for another user (%s) need an admin key: %w", r.User, errdefs.ErrPermissionDenied)
		}
		who = r.User
		m, err := h.s.store.GetMember(ctx, p.OrgID, who)
		if err != nil {
			return nil, err
		}
		if role.Rank() > m.Role.Rank() {
			return nil, invalid("role %s: higher than user %s's role %s in org %q", role, who, m.Role, p.OrgID)
		}
	}
	if r.TtlSeconds < 0 || r.TtlSeconds > math.MaxInt64/int64(time.Second) {
		return nil, invalid("ttl_seconds %d: want 0 (no expiry) or more", r.TtlSeconds)
	}
	name := strings.TrimSpace(r.Name)
	if name == "" || len(name) > 128 {
		return nil, invalid("name %q: required, at most 128 characters", r.Name)
	}
	key, secret := newAPIKey(p.OrgID, who, name, role, p.Subject, time.Now().UTC(), time.Duration(r.TtlSeconds)*time.Second)
	if err := h.s.store.CreateKey(ctx, key); err != nil {
		return nil, err
	}
	setAuditObject(ctx, "key:"+key.Prefix)
	return connect.NewResponse(keyProto(key, secret)), nil
}

func (h *teamService) ListKeys(ctx context.Context, req *connect.Request[v1.ListKeysRequest]) (*connect.Response[v1.ListKeysResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	who := p.User
	if req.Msg.All {
		if p.Role != store.RoleAdmin {
			return nil, fmt.Errorf("listing every member's keys needs an admin key: %w", errdefs.ErrPermissionDenied)
		}
		who = ""
	}
	keys, err := h.s.store.ListKeys(ctx, p.OrgID, who)
	if err != nil {
		return nil, err
	}
	out := &v1.ListKeysResponse{}
	for _, k := range keys {
		out.Keys = append(out.Keys, keyProto(k, ""))
	}
	return connect.NewResponse(out), nil
}

func (h *teamService) RevokeKey(ctx context.Context, req *connect.Request[v1.RevokeKeyRequest]) (*connect.Response[v1.RevokeKeyResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	k, err := h.s.store.GetKey(ctx, p.OrgID, req.Msg.Id)
	if err != nil {
		return nil, err
	}
	if k.User != p.User && p.Role != store.RoleAdmin {
		return nil, fmt.Errorf("API key %s belongs to %s; revoking another user's key needs an admin key: %w", k.Prefix, k.User, errdefs.ErrPermissionDenied)
	}
	if err := h.s.store.RevokeKey(ctx, p.OrgID, k.ID, time.Now().UTC()); err != nil {
		return nil, err
	}
	if k, err = h.s.store.GetKey(ctx, p.OrgID, k.ID); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.RevokeKeyResponse{Key: keyProto(k, "")}), nil
}

func (h *teamService) GetQuota(ctx context.Context, req *connect.Request[v1.GetQuotaRequest]) (*connect.Response[v1.Quota], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	q, err := h.s.quotaWithUse(ctx, orgOf(p, req.Msg.Org))
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(q), nil
}

func (h *teamService) SetQuota(ctx context.Context, req *connect.Request[v1.SetQuotaRequest]) (*connect.Response[v1.Quota], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	org := orgOf(p, req.Msg.Org)
	in := req.Msg.Quota
	if in == nil {
		return nil, invalid("quota: required")
	}
	if in.MaxRunningSandboxes < 0 || in.MaxVcpu < 0 || math.IsNaN(in.MaxVcpu) || math.IsInf(in.MaxVcpu, 0) || in.MaxMemoryMb < 0 || in.MaxCreatesPerMinute < 0 {
		return nil, invalid("quota: limits must be 0 (the node's default) or more")
	}
	if in.MaxUploadBytes < -1 {
		return nil, invalid("quota: max_upload_bytes %d: want -1 (no limit), 0 (the node's default) or more", in.MaxUploadBytes)
	}
	q := store.Quota{MaxRunning: int(in.MaxRunningSandboxes), MaxVCPU: in.MaxVcpu, MaxMemoryMB: in.MaxMemoryMb, MaxCreatesPerMinute: int(in.MaxCreatesPerMinute),
		MaxUploadBytes: in.MaxUploadBytes}
	setAuditObject(ctx, "org:"+org)
	if err := h.s.store.SetQuota(ctx, org, q); err != nil {
		return nil, err
	}
	eff, err := h.s.quotaWithUse(ctx, org)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(eff), nil
}

func (h *teamService) Audit(ctx context.Context, req *connect.Request[v1.AuditRequest]) (*connect.Response[v1.AuditResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	q := store.AuditQuery{OrgID: p.OrgID, Action: req.Msg.Action, Limit: int(req.Msg.Limit)}
	if req.Msg.Since != "" {
		if q.Since, err = time.Parse(time.RFC3339, req.Msg.Since); err != nil {
			return nil, invalid("since %q: want RFC 3339", req.Msg.Since)
		}
	}
	// Records of batched calls (exec) that are still queued first: a
	// caller sees its own calls.
	h.s.audits.Flush(ctx)
	recs, err := h.s.store.ListAudit(ctx, q)
	if err != nil {
		return nil, err
	}
	out := &v1.AuditResponse{}
	for _, r := range recs {
		out.Records = append(out.Records, &v1.AuditRecord{
			Seq: r.Seq, At: ts(r.At), Org: r.OrgID, Actor: r.Actor, Via: r.Via, Peer: r.Peer,
			Action: r.Action, Object: r.Object, Outcome: r.Outcome, Detail: r.Detail,
		})
	}
	return connect.NewResponse(out), nil
}

// quotaOf is an org's quota in force: its own limits, the node's defaults
// where unset. An org with no record (a pre-teams id) has the defaults.
func (s *Server) quotaOf(ctx context.Context, org string) (store.Quota, error) {
	o, err := s.store.GetOrg(ctx, org)
	if errdefs.Is(err, errdefs.ErrNotFound) {
		return s.cfg.DefaultQuota, nil
	}
	if err != nil {
		return store.Quota{}, err
	}
	return o.Quota.Or(s.cfg.DefaultQuota), nil
}

func (h *teamService) SetMemberRole(ctx context.Context, req *connect.Request[v1.SetMemberRoleRequest]) (*connect.Response[v1.Member], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	role, err := store.ParseRole(req.Msg.Role)
	if err != nil {
		return nil, err
	}
	org := orgOf(p, req.Msg.Org)
	setAuditObject(ctx, "member:"+org+"/"+req.Msg.User)
	if err := h.s.store.SetMemberRole(ctx, org, req.Msg.User, role); err != nil {
		return nil, err
	}
	m, err := h.s.store.GetMember(ctx, org, req.Msg.User)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.Member{User: m.User, Role: string(m.Role), CreatedAt: ts(m.CreatedAt)}), nil
}
