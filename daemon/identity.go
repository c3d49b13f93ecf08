package daemon

import (
	"cmp"
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
	"github.com/chalkcompute/chalkcompute/store"
)

// workloadIdentity connects the OIDC issuer to the API (workload tokens, token
// minting, key rotation) and to sandboxes (metadata service, token files,
// cloud federation).
type workloadIdentity struct {
	iss     *identity.Issuer
	meta    *metadata.Server
	store   *store.Store
	live    *api.Live         // which sandboxes run, and at which address
	pol     api.PolicyBackend // set once egress is up (before the API serves); nil: no policies
	filesAt string            // host dir holding one identity dir per sandbox
	// userNS gives a sandbox's user namespace (nil: none), whose root must
	// reach its identity dir and nobody else's.
	userNS func(id string, slot int) *sandboxnet.UserNS
	// queryURL, if set, is the Chalk query server sandboxes get a token for.
	queryURL string
	// awsRegion is the region of sandboxes with an AWS role whose create
	// request names none ("" = metadata.DefaultAWSRegion).
	awsRegion string

	// removing counts identity dirs being removed in the background (a
	// graceful stop waits for them).
	removing sync.WaitGroup

	mu    sync.Mutex
	stops map[string][]func()
	known map[string]metadata.Sandbox // running sandbox -> its fixed fields (SandboxByAddr)
}

var (
	_ api.WorkloadVerifier = (*workloadIdentity)(nil)
	_ api.IdentityBackend  = (*workloadIdentity)(nil)
	_ metadata.Resolver    = (*workloadIdentity)(nil)
)

// subject is the identity of sb now: its network_policy claim is computed
// from the policies bound to it at this moment (api.PolicyHash), so
// every token minted, by any path, carries the policy in force.
func (w *workloadIdentity) subject(ctx context.Context, sb *store.Sandbox) (identity.Subject, error) {
	ph, err := api.PolicyHash(ctx, w.store, w.pol, sb)
	if err != nil {
		return identity.Subject{}, err
	}
	return identity.Subject{OrgID: sb.OrgID, SandboxID: sb.ID, ImageDigest: sb.ImageHash, NetworkPolicy: ph, CreatedBy: sb.CreatedBy}, nil
}

// VerifyWorkload accepts a workload token for the API audience of a running sandbox.
func (w *workloadIdentity) VerifyWorkload(ctx context.Context, token string) (*api.Principal, error) {
	c, err := w.iss.Verify(ctx, token, api.APIAudience)
	if err != nil {
		return nil, err
	}
	return &api.Principal{Kind: "workload", OrgID: c.OrgID, SandboxID: c.SandboxID, Subject: c.Subject}, nil
}

// Mint mints a token for a sandbox.
func (w *workloadIdentity) Mint(ctx context.Context, sb *store.Sandbox, audience string, ttl time.Duration) (string, time.Time, error) {
	sub, err := w.subject(ctx, sb)
	if err != nil {
		return "", time.Time{}, err
	}
	return w.iss.Mint(ctx, sub, audience, ttl)
}

// Rotate forces a key rotation and returns the published key ids.
func (w *workloadIdentity) Rotate(ctx context.Context) ([]string, error) {
	if err := w.iss.Rotate(ctx); err != nil {
		return nil, err
	}
	var kids []string
	for _, k := range w.iss.JWKS().Keys {
		kids = append(kids, k.KeyID)
	}
	return kids, nil
}

// SandboxByAddr resolves metadata callers by source address.
//
// It runs for every request to the metadata service (the MCP gateway's
// included), so it reads no store on the way: the live set says which
// sandbox runs at a and is not being ended (api.Live.RunningAt), and the
// fields that never change for a sandbox are remembered from its record,
// read once. The network_policy claim, which changes with the policies,
// is computed only when a token or the identity is asked for (PolicyNow).
func (w *workloadIdentity) SandboxByAddr(ctx context.Context, a netip.Addr) (metadata.Sandbox, bool) {
	id, ok := w.live.RunningAt(a)
	if !ok {
		return metadata.Sandbox{}, false
	}
	w.mu.Lock()
	known, ok := w.known[id]
	w.mu.Unlock()
	if !ok {
		sb, found := w.live.SandboxByAddr(ctx, w.store, a)
		if !found || sb.ID != id {
			return metadata.Sandbox{}, false
		}
		known = metadata.Sandbox{ID: sb.ID, OrgID: sb.OrgID, ImageDigest: sb.ImageHash, CreatedBy: sb.CreatedBy, Running: true}
		w.mu.Lock()
		if w.known == nil {
			w.known = map[string]metadata.Sandbox{}
		}
		w.known[id] = known
		w.mu.Unlock()
	}
	known.PolicyNow = func(ctx context.Context) (string, error) {
		sb, err := w.store.GetSandbox(ctx, id)
		if err != nil {
			return "", err
		}
		return api.PolicyHash(ctx, w.store, w.pol, sb)
	}
	return known, true
}

// prepare gives a starting sandbox its identity dir: the Chalk API token file
// (so `chalk` inside authenticates as the sandbox itself) and cloud federation
// files when asked for. Nothing of the creating user's is passed in.
func (w *workloadIdentity) prepare(ctx context.Context, sb *store.Sandbox, req *node.StartRequest) error {
	dir, err := w.identityDir(sb)
	if err != nil {
		return err
	}
	feds := w.federations(sb)
	var stops []func()
	for _, mk := range feds {
		f, err := mk()
		if err != nil {
			for _, s := range stops {
				s()
			}
			return fmt.Errorf("sandbox identity: %v: %w", err, errdefs.ErrInvalidArgument)
		}
		rec := *sb
		stop, err := metadata.StartTokenFileConfig(context.WithoutCancel(ctx), metadata.TokenFileConfig{
			Issuer: w.iss, Subject: identity.Subject{OrgID: rec.OrgID, SandboxID: rec.ID}, Audience: f.Audience, Path: filepath.Join(dir, f.TokenFileName),
			SubjectNow: func(ctx context.Context) (identity.Subject, error) { return w.subject(ctx, &rec) },
			// A claimed pre-started sandbox has its API token file made
			// empty at pre-start (binds): the first token goes into it.
			FirstInPlace: true,
		})
		if err == nil {
			err = f.WriteFiles(dir)
		}
		if err != nil {
			for _, s := range stops {
				s()
			}
			return err
		}
		stops = append(stops, stop)
		req.Env = append(req.Env, f.Env...)
	}
	w.mu.Lock()
	w.stops[sb.ID] = stops
	w.mu.Unlock()
	req.Binds = append(req.Binds, identityBind(dir))
	return nil
}

// federations are the identity files and environment of sandbox sb: the
// Chalk API token file, the query server's, and cloud federation when
// asked for.
func (w *workloadIdentity) federations(sb *store.Sandbox) []func() (metadata.Federation, error) {
	feds := []func() (metadata.Federation, error){
		func() (metadata.Federation, error) {
			return metadata.ChalkAPIFederation(api.APIAudience, metadata.URL+"/api")
		},
	}
	if w.queryURL != "" {
		feds = append(feds, func() (metadata.Federation, error) { return metadata.ChalkQueryFederation(w.queryURL) })
	}
	if sb.AWSRoleARN != "" {
		feds = append(feds, func() (metadata.Federation, error) {
			return metadata.AWSFederation(sb.AWSRoleARN, sb.ID, cmp.Or(sb.AWSRegion, w.awsRegion))
		})
	}
	if sb.GCPProvider != "" {
		feds = append(feds, func() (metadata.Federation, error) {
			return metadata.GCPFederation(sb.GCPProvider, sb.GCPServiceAccount)
		})
	}
	return feds
}

func identityBind(dir string) sandbox.Bind {
	return sandbox.Bind{Source: dir, Dest: metadata.SandboxIdentityDir, ReadOnly: true}
}

// binds makes the identity dir of a pre-started sandbox, empty until it is
// claimed (prepare then fills it, before its init is activated) but for an
// empty Chalk API token file: the claim writes the first token into it
// rather than create a file and rename it over (metadata.PrepareTokenFile).
func (w *workloadIdentity) binds(id string, slot int) ([]sandbox.Bind, error) {
	dir, err := w.identityDir(&store.Sandbox{ID: id, Slot: slot})
	if err != nil {
		return nil, err
	}
	if err := metadata.PrepareTokenFile(filepath.Join(dir, metadata.ChalkTokenFileName)); err != nil {
		return nil, err
	}
	return []sandbox.Bind{identityBind(dir)}, nil
}

// discard removes the identity dir of a pre-started sandbox never claimed.
func (w *workloadIdentity) discard(id string) { _ = os.RemoveAll(filepath.Join(w.filesAt, id)) }

// identityDir makes the host dir bind-mounted at the sandbox's identity dir:
// filesAt/<id>/files, 0755 so every user in the sandbox reads its tokens,
// inside filesAt/<id>, root:<the sandbox's root's host gid> 0710 under a user
// namespace (root only without), so the sandbox's root can reach it (runc
// binds it from inside the user namespace) and another sandbox's uids
// cannot, even after an escape.
//
// A sandbox started by an older chalkd has its files directly in
// filesAt/<id> (bind-mounted as such): that dir is kept, so its tokens keep
// being refreshed where it sees them.
func (w *workloadIdentity) identityDir(sb *store.Sandbox) (string, error) {
	outer := filepath.Join(w.filesAt, sb.ID)
	if st, err := os.Stat(filepath.Join(outer, metadata.ChalkTokenFileName)); err == nil && st.Mode().IsRegular() {
		return outer, nil
	}
	if err := os.MkdirAll(outer, 0o700); err != nil {
		return "", err
	}
	mode := os.FileMode(0o700)
	if w.userNS != nil {
		if u := w.userNS(sb.ID, sb.Slot); u != nil {
			if err := os.Chown(outer, 0, int(u.HostID)); err != nil {
				return "", err
			}
			mode = 0o710
		}
	}
	if err := os.Chmod(outer, mode); err != nil {
		return "", err
	}
	dir := filepath.Join(outer, "files")
	return dir, os.MkdirAll(dir, 0o755)
}

// ended stops refreshing the sandbox's tokens and removes its identity dir
// in the background: the sandbox runs nothing any more and its tokens are
// refused already (it is no longer live); removing files from disk is not
// what its Terminate waits for.
func (w *workloadIdentity) ended(_ context.Context, sb *store.Sandbox) {
	w.mu.Lock()
	stops := w.stops[sb.ID]
	delete(w.stops, sb.ID)
	delete(w.known, sb.ID)
	w.mu.Unlock()
	for _, s := range stops {
		s()
	}
	w.meta.Forget(sb.ID)
	dir := filepath.Join(w.filesAt, sb.ID)
	w.removing.Add(1)
	go func() {
		defer w.removing.Done()
		_ = os.RemoveAll(dir)
	}()
}

// restart resumes token refresh for a sandbox found running at start.
func (w *workloadIdentity) resume(ctx context.Context, sb *store.Sandbox) {
	var req node.StartRequest
	if err := w.prepare(ctx, sb, &req); err != nil {
		w.meta.Forget(sb.ID)
	}
}

// sandboxAPI serves the API under /api for sandboxes: the token in the
// request authenticates (before any body is read), and a workload token only
// from the sandbox it was issued to, which the metadata service knows from
// the connection's source address. A token copied out of one sandbox is
// useless from another.
func sandboxAPI(a *api.Server) http.Handler {
	return http.StripPrefix("/api", a.SandboxHandler(func(r *http.Request) (string, bool) {
		sb, ok := metadata.CallerFrom(r.Context())
		return sb.ID, ok && sb.Running
	}))
}
