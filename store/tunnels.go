package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Tunnel is a named WireGuard tunnel of an org. Index numbers its subnet;
// members are runtime state (the node's devices), external peers are here.
type Tunnel struct {
	OrgID     string       `json:"org_id"`
	Name      string       `json:"name"`
	Index     int          `json:"index"`
	Peers     []TunnelPeer `json:"peers"`
	CreatedAt time.Time    `json:"created_at"`
	UpdatedAt time.Time    `json:"updated_at"`
}

// TunnelPeer is an external WireGuard peer of a tunnel.
type TunnelPeer struct {
	PublicKey  string   `json:"public_key"`
	AllowedIPs []string `json:"allowed_ips"`
	Endpoint   string   `json:"endpoint,omitempty"`
}

// EnsureTunnel returns the org's tunnel name, creating it (with the lowest
// free index below max) if it does not exist yet.
func (s *Store) EnsureTunnel(ctx context.Context, orgID, name string, max int) (*Tunnel, bool, error) {
	return s.EnsureTunnelLimit(ctx, orgID, name, max, 0)
}

// EnsureTunnelLimit is EnsureTunnel refusing (resource exhausted) a new
// tunnel of an org that has perOrg tunnels already (0: no limit): the
// indexes are shared by every org, so without it one org could take them
// all.
func (s *Store) EnsureTunnelLimit(ctx context.Context, orgID, name string, max, perOrg int) (*Tunnel, bool, error) {
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return nil, false, err
	}
	defer tx.Rollback()
	// One allocation of a tunnel index at a time (indexes are the node's).
	if err := tx.d.lock(ctx, tx, "tunnels"); err != nil {
		return nil, false, err
	}
	if t, err := getTunnel(ctx, tx, orgID, name); err == nil {
		return t, false, nil
	} else if !errors.Is(err, errdefs.ErrNotFound) {
		return nil, false, err
	}
	if perOrg > 0 {
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM tunnels WHERE org_id = ?`, orgID).Scan(&n); err != nil {
			return nil, false, err
		}
		if n >= perOrg {
			return nil, false, fmt.Errorf("tunnel %q: org %q has %d tunnels, the most an org may have (chalkd --org-max-tunnels); delete one first: %w",
				name, orgID, n, errdefs.ErrResourceExhausted)
		}
	}
	// The lowest free index.
	rows, err := tx.QueryContext(ctx, `SELECT idx FROM tunnels ORDER BY idx`)
	if err != nil {
		return nil, false, err
	}
	idx := 0
	for rows.Next() {
		var i int
		if err := rows.Scan(&i); err != nil {
			rows.Close()
			return nil, false, err
		}
		if i == idx {
			idx++
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, false, err
	}
	if idx >= max {
		return nil, false, fmt.Errorf("tunnel %q: all %d tunnel subnets are in use: %w", name, max, errdefs.ErrResourceExhausted)
	}
	now := time.Now().UTC()
	t := &Tunnel{OrgID: orgID, Name: name, Index: idx, CreatedAt: now, UpdatedAt: now}
	doc, err := json.Marshal(t)
	if err != nil {
		return nil, false, err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO tunnels (org_id, name, idx, doc) VALUES (?, ?, ?, ?)`, orgID, name, idx, doc); err != nil {
		return nil, false, err
	}
	return t, true, tx.Commit()
}

// PutTunnel replaces a tunnel's document (its peers); the tunnel must exist.
func (s *Store) PutTunnel(ctx context.Context, t *Tunnel) error {
	t.UpdatedAt = time.Now().UTC()
	doc, err := json.Marshal(t)
	if err != nil {
		return err
	}
	res, err := s.db.ExecContext(ctx, `UPDATE tunnels SET doc = ? WHERE org_id = ? AND name = ?`, doc, t.OrgID, t.Name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("tunnel %q: %w", t.Name, errdefs.ErrNotFound)
	}
	return nil
}

// GetTunnel returns the org's tunnel name.
func (s *Store) GetTunnel(ctx context.Context, orgID, name string) (*Tunnel, error) {
	return getTunnel(ctx, s.db, orgID, name)
}

func getTunnel(ctx context.Context, q queryer, orgID, name string) (*Tunnel, error) {
	return getNamed[Tunnel](ctx, q, "tunnels", "tunnel", orgID, name)
}

// ListTunnels lists an org's tunnels by name.
func (s *Store) ListTunnels(ctx context.Context, orgID string) ([]*Tunnel, error) {
	return listNamed[Tunnel](ctx, s.db, "tunnels", orgID)
}

// DeleteTunnel removes a tunnel.
func (s *Store) DeleteTunnel(ctx context.Context, orgID, name string) error {
	return deleteNamed(ctx, s.db, "tunnels", "tunnel", orgID, name)
}
