package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/atomicfile"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/noderpc"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/store"
)

// Identity files of node sandboxes. The control plane decides them as for
// its own sandboxes (workloadIdentity.federations: the Chalk API token
// file, the query server's, cloud federation) and sends them with the
// Start (node.StartRequest.Identity, with the environment naming them);
// the node writes them into the sandbox's identity dir, bound read-only
// at /run/chalk/identity as in the all-in-one daemon, and keeps the token
// files fresh with tokens it gets from FleetService.Workload (only for
// sandboxes placed on it). The node holds no signing key.

// fleetIdentityFiles is what the control plane sends a node for sb, and
// the environment it adds to the sandbox's.
func (w *workloadIdentity) fleetIdentityFiles(sb *store.Sandbox, req *node.StartRequest) error {
	for _, mk := range w.federations(sb) {
		f, err := mk()
		if err != nil {
			return fmt.Errorf("sandbox identity: %v: %w", err, errdefs.ErrInvalidArgument)
		}
		req.Identity = append(req.Identity, node.IdentityFile{Name: f.TokenFileName, Audience: f.Audience})
		for name, b := range f.Files {
			req.Identity = append(req.Identity, node.IdentityFile{Name: name, Content: b})
		}
		req.Env = append(req.Env, f.Env...)
	}
	return nil
}

// nodeIdentity is a node's noderpc.Identity.
type nodeIdentity struct {
	d *Daemon

	mu    sync.Mutex
	stops map[string][]func()
}

var _ noderpc.Identity = (*nodeIdentity)(nil)

// keptIdentity is what a node keeps of a sandbox's identity files
// (identity-files/<id>/files.json, root only), to resume their refresh
// after a restart of the node process.
type keptIdentity struct {
	Slot  int                 `json:"slot"`
	Files []node.IdentityFile `json:"files"`
}

// specFile is where sandbox id's identity files are kept.
func (n *nodeIdentity) specFile(id string) (string, error) {
	if _, err := (nodeEgress{n.d}).policiesFile(id); err != nil { // the same id check
		return "", err
	}
	return filepath.Join(n.d.wi.filesAt, id, "files.json"), nil
}

func (n *nodeIdentity) Prepare(ctx context.Context, id string, slot int, files []node.IdentityFile) (_ sandbox.Bind, err error) {
	spec, err := n.specFile(id)
	if err != nil {
		return sandbox.Bind{}, err
	}
	n.stop(id) // a start tried again
	defer func() {
		if err != nil {
			n.Remove(id) // nothing half-written stays
		}
	}()
	dir, err := n.d.wi.identityDir(&store.Sandbox{ID: id, Slot: slot})
	if err != nil {
		return sandbox.Bind{}, err
	}
	b, err := json.Marshal(keptIdentity{Slot: slot, Files: files})
	if err != nil {
		return sandbox.Bind{}, err
	}
	if err := atomicfile.WriteFile(spec, b, 0o600); err != nil {
		return sandbox.Bind{}, err
	}
	if err := n.start(id, dir, files); err != nil {
		return sandbox.Bind{}, err
	}
	return identityBind(dir), nil
}

// start writes the files and starts refreshing the tokens.
func (n *nodeIdentity) start(id, dir string, files []node.IdentityFile) error {
	static := metadata.Federation{Files: map[string][]byte{}}
	var stops []func()
	for _, f := range files {
		if f.Audience == "" {
			static.Files[f.Name] = f.Content
			continue
		}
		stop, err := metadata.StartTokenFileConfig(context.Background(), metadata.TokenFileConfig{
			Issuer: fleetMinter{n.d.nodeWL}, Subject: identity.Subject{SandboxID: id}, Audience: f.Audience,
			Path: filepath.Join(dir, f.Name), Logger: n.d.log,
		})
		if err != nil {
			for _, s := range stops {
				s()
			}
			return err
		}
		stops = append(stops, stop)
	}
	if err := static.WriteFiles(dir); err != nil {
		for _, s := range stops {
			s()
		}
		return err
	}
	n.mu.Lock()
	n.stops[id] = stops
	n.mu.Unlock()
	return nil
}

func (n *nodeIdentity) stop(id string) {
	n.mu.Lock()
	stops := n.stops[id]
	delete(n.stops, id)
	n.mu.Unlock()
	for _, s := range stops {
		s()
	}
}

func (n *nodeIdentity) Remove(id string) {
	if _, err := n.specFile(id); err != nil {
		return
	}
	n.stop(id)
	_ = os.RemoveAll(filepath.Join(n.d.wi.filesAt, id))
}

// Restore removes the files of sandboxes not live here and resumes those
// of live ones not refreshed by this process.
func (n *nodeIdentity) Restore(ctx context.Context, live map[string]int) {
	ents, _ := os.ReadDir(n.d.wi.filesAt)
	for _, ent := range ents {
		id := ent.Name()
		if _, ok := live[id]; !ok {
			n.Remove(id)
		}
	}
	n.resume(live)
}

// resume restarts the refresh of kept identity files (those of ids in
// only, unless nil: every kept one, at the node's start).
func (n *nodeIdentity) resume(only map[string]int) {
	ents, _ := os.ReadDir(n.d.wi.filesAt)
	for _, ent := range ents {
		id := ent.Name()
		if _, ok := only[id]; only != nil && !ok {
			continue
		}
		n.mu.Lock()
		_, running := n.stops[id]
		n.mu.Unlock()
		spec, err := n.specFile(id)
		if running || err != nil {
			continue
		}
		b, err := os.ReadFile(spec)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		var k keptIdentity
		if err == nil {
			err = json.Unmarshal(b, &k)
		}
		if err == nil {
			err = n.start(id, filepath.Join(n.d.wi.filesAt, id, "files"), k.Files)
		}
		if err != nil {
			n.d.log.Warn("identity files: resume the refresh of a sandbox's tokens", "sandbox", id, "err", err)
		}
	}
}

// fleetMinter mints a node sandbox's token file tokens through the control
// plane; a sandbox the control plane no longer places here has ended for
// this node (its refresh stops: metadata.StartTokenFileConfig ends on
// failed_precondition).
type fleetMinter struct{ w *nodeWorkloads }

func (m fleetMinter) Mint(ctx context.Context, sub identity.Subject, aud string, ttl time.Duration) (string, time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tok, exp, err := m.w.Mint(ctx, sub, aud, ttl)
	if errors.Is(err, errdefs.ErrPermissionDenied) {
		err = fmt.Errorf("%v: %w", err, errdefs.ErrFailedPrecondition)
	}
	return tok, exp, err
}

func (m fleetMinter) Now() time.Time { return time.Now() }
