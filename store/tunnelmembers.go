package store

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TunnelMember is a sandbox's membership of a fleet tunnel (table
// tunnel_members): the control plane's record of where its device runs.
// A row with no PublicKey is an address reserved by a join in flight.
type TunnelMember struct {
	OrgID     string `json:"org_id"`
	Tunnel    string `json:"tunnel"` // the tunnel's name
	SandboxID string `json:"sandbox_id"`
	Node      string `json:"node,omitempty"`
	Slot      int    `json:"slot"`
	Addr      string `json:"addr"`
	Interface string `json:"interface,omitempty"`
	PublicKey string `json:"public_key,omitempty"`
	Port      int    `json:"port,omitempty"`
	Endpoint  string `json:"endpoint,omitempty"`
}

// AddTunnelMember records a new member. Its address (or the sandbox) being
// in the tunnel already is ErrAlreadyExists: the caller chooses another
// address.
func (s *Store) AddTunnelMember(ctx context.Context, m *TunnelMember) error {
	doc, err := json.Marshal(m)
	if err != nil {
		return err
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO tunnel_members (org_id, tunnel, sandbox_id, addr, doc) VALUES (?, ?, ?, ?, ?)`,
		m.OrgID, m.Tunnel, m.SandboxID, m.Addr, doc)
	if err != nil {
		if s.db.d.conflict(err) {
			return fmt.Errorf("tunnel %q: address %s or sandbox %s is taken: %w", m.Tunnel, m.Addr, m.SandboxID, errdefs.ErrAlreadyExists)
		}
		return err
	}
	return nil
}

// PutTunnelMember replaces a member's record (its address may change:
// taken by another member is ErrAlreadyExists); the member must exist.
func (s *Store) PutTunnelMember(ctx context.Context, m *TunnelMember) error {
	doc, err := json.Marshal(m)
	if err != nil {
		return err
	}
	res, err := s.db.ExecContext(ctx, `UPDATE tunnel_members SET addr = ?, doc = ? WHERE org_id = ? AND tunnel = ? AND sandbox_id = ?`,
		m.Addr, doc, m.OrgID, m.Tunnel, m.SandboxID)
	if err != nil {
		if s.db.d.conflict(err) {
			return fmt.Errorf("tunnel %q: address %s is another member's: %w", m.Tunnel, m.Addr, errdefs.ErrAlreadyExists)
		}
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("tunnel %q member %s: %w", m.Tunnel, m.SandboxID, errdefs.ErrNotFound)
	}
	return nil
}

// DeleteTunnelMember removes a sandbox from a tunnel; whether it was in it.
func (s *Store) DeleteTunnelMember(ctx context.Context, orgID, tunnel, sandboxID string) (bool, error) {
	res, err := s.db.ExecContext(ctx, `DELETE FROM tunnel_members WHERE org_id = ? AND tunnel = ? AND sandbox_id = ?`, orgID, tunnel, sandboxID)
	if err != nil {
		return false, err
	}
	n, _ := res.RowsAffected()
	return n > 0, nil
}

// ListTunnelMembers lists a tunnel's members ("" tunnel: every tunnel's,
// of every org when orgID is "" too), by org, tunnel and sandbox.
func (s *Store) ListTunnelMembers(ctx context.Context, orgID, tunnel string) ([]*TunnelMember, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT doc FROM tunnel_members WHERE (? = '' OR org_id = ?) AND (? = '' OR tunnel = ?) ORDER BY org_id, tunnel, sandbox_id`,
		orgID, orgID, tunnel, tunnel)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*TunnelMember
	for rows.Next() {
		var doc []byte
		if err := rows.Scan(&doc); err != nil {
			return nil, err
		}
		m := &TunnelMember{}
		if err := json.Unmarshal(doc, m); err != nil {
			return nil, fmt.Errorf("tunnel member record: %w", err)
		}
		out = append(out, m)
	}
	return out, rows.Err()
}
