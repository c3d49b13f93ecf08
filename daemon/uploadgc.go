package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/store"
)

// Upload GC (imagebuild/gc.go): uploaded content (DataDir/blobs, the
// extracted DataDir/mounts/<hex>) is removed once no live sandbox binds it,
// nothing holds it (a build, a create until its record exists, a node's
// copy sent for a start that has not run yet) and its last use is older
// than --upload-gc-grace. What refers to it:
//
//   - all-in-one and control plane: the mounts of the store's live records
//     (creating, running, stopping; with replicas, every replica's: the
//     leader collects, the blobs being shared);
//   - all-in-one and node: the bind sources in the OCI bundles of the
//     sandboxes on this machine (DataDir/sandboxes/<id>/bundle/config.json,
//     written by chalkd; never followed into a sandbox).
//
// Everything is read anew at each pass (the grace from the files' mtimes),
// so a restart loses nothing; a pass runs at start. What an interrupted
// upload or extraction left goes once untouched for the grace.

var (
	uploadGCRemoved = prometheus.NewCounter(prometheus.CounterOpts{Name: "chalk_upload_gc_removed_total",
		Help: "uploaded contents (blobs with their extracted trees) removed by the upload GC"})
	uploadGCBytes = prometheus.NewCounter(prometheus.CounterOpts{Name: "chalk_upload_gc_removed_bytes_total",
		Help: "bytes of uploaded blobs removed by the upload GC"})
	uploadGCErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "chalk_upload_gc_errors_total",
		Help: "upload GC passes that failed (nothing, or not everything, removed)"})
)

func init() { prometheus.MustRegister(uploadGCRemoved, uploadGCBytes, uploadGCErrors) }

// DefaultUploadGCGrace is --upload-gc-grace's default.
const DefaultUploadGCGrace = time.Hour

// uploadGCEvery is how often a pass runs for a grace.
func uploadGCEvery(grace time.Duration) time.Duration {
	return min(max(grace/4, time.Second), 10*time.Minute)
}

// uploadRecords are the orgs' records of their uploads (storeUploads).
type uploadRecords interface {
	UploadDigests(context.Context) ([]string, error)
	// LockUpload is the lock uploads through any replica commit under
	// (store.CommitUpload); the records go with its Forget.
	LockUpload(context.Context, string) (uploadLock, error)
}

// uploadLock is a held *store.UploadLock.
type uploadLock interface {
	Forget(context.Context) error
	Release() error
}

// storeUploads are the records of uploads in the store.
type storeUploads struct{ *store.Store }

func (s storeUploads) LockUpload(ctx context.Context, d string) (uploadLock, error) {
	return s.Store.LockUpload(ctx, d)
}

// uploadLocks gives a pass's Collect and ForgetMissing the upload lock of
// each digest they remove (CollectOptions.Lock) and drops the records
// under it (Forget).
type uploadLocks struct {
	ctx  context.Context
	recs uploadRecords
	mu   sync.Mutex
	held map[string]uploadLock
}

func (u *uploadLocks) lock(d string) (release func(), err error) {
	l, err := u.recs.LockUpload(u.ctx, d)
	if err != nil {
		return nil, err
	}
	u.mu.Lock()
	u.held[d] = l
	u.mu.Unlock()
	return func() {
		u.mu.Lock()
		delete(u.held, d)
		u.mu.Unlock()
		// An error leaves the records (a later pass drops those of
		// content not stored).
		_ = l.Release()
	}, nil
}

func (u *uploadLocks) forget(d string) error {
	u.mu.Lock()
	l := u.held[d]
	u.mu.Unlock()
	if l == nil {
		return fmt.Errorf("upload GC: the records of %s dropped without its upload lock", d)
	}
	return l.Forget(u.ctx)
}

// uploadGC runs passes over blobs until ctx ends (grace <= 0: never).
// leading (nil: always) says whether this process collects now; recs
// (nil: none) are the orgs' records of uploads, dropped with the content
// removed (CollectOptions.Forget) and, at each pass, for content not
// stored.
func uploadGC(ctx context.Context, log *slog.Logger, blobs *imagebuild.Blobs, extracted string, grace time.Duration,
	leading func() bool, recs uploadRecords, refs ...func(context.Context) (map[string]bool, error)) {
	if grace <= 0 {
		return
	}
	t := time.NewTicker(uploadGCEvery(grace))
	defer t.Stop()
	for {
		if leading == nil || leading() {
			uploadGCPass(ctx, log, blobs, extracted, grace, recs, refs...)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func uploadGCPass(ctx context.Context, log *slog.Logger, blobs *imagebuild.Blobs, extracted string, grace time.Duration,
	recs uploadRecords, refs ...func(context.Context) (map[string]bool, error)) {
	var forget func(string) error
	var lock func(string) (func(), error)
	if recs != nil {
		u := &uploadLocks{ctx: ctx, recs: recs, held: map[string]uploadLock{}}
		forget, lock = u.forget, u.lock
	}
	res, err := blobs.Collect(ctx, imagebuild.CollectOptions{Grace: grace, Extracted: extracted, Forget: forget, Lock: lock,
		Refs: func(ctx context.Context) (map[string]bool, error) {
			all := map[string]bool{}
			for _, r := range refs {
				m, err := r(ctx)
				if err != nil {
					return nil, err
				}
				for d := range m {
					all[d] = true
				}
			}
			return all, nil
		}})
	uploadGCRemoved.Add(float64(len(res.Digests)))
	uploadGCBytes.Add(float64(res.Bytes))
	if len(res.Digests) > 0 || res.Temps > 0 {
		log.Info("upload GC: removed unreferenced uploads", "count", len(res.Digests), "bytes", res.Bytes,
			"kept", res.Kept, "interrupted", res.Temps, "grace", grace, "digests", res.Digests)
	}
	if err != nil && ctx.Err() == nil {
		uploadGCErrors.Inc()
		log.Warn("upload GC", "err", err)
	}
	if recs == nil || ctx.Err() != nil {
		return
	}
	// Records of content not stored (removed before records were dropped
	// with it, or never written) go too: their orgs are charged for them
	// no more.
	ds, err := recs.UploadDigests(ctx)
	if err == nil {
		var n int
		n, err = blobs.ForgetMissing(ds, forget, lock)
		if n > 0 {
			log.Info("upload GC: dropped the records of uploads not stored", "count", n)
		}
	}
	if err != nil && ctx.Err() == nil {
		uploadGCErrors.Inc()
		log.Warn("upload GC: the records of uploads not stored", "err", err)
	}
}

// storeMountRefs: the digests the store's live sandboxes mount.
func storeMountRefs(st *store.Store) func(context.Context) (map[string]bool, error) {
	return func(ctx context.Context) (map[string]bool, error) {
		sbs, err := st.ListSandboxes(ctx, "", true)
		if err != nil {
			return nil, err
		}
		out := map[string]bool{}
		for _, sb := range sbs {
			for _, m := range sb.Mounts {
				out[m.Digest] = true
			}
		}
		return out, nil
	}
}

// bundleRefs: the digests whose content (a blob in blobsDir, a tree in
// extracted) a sandbox on this machine binds, from their bundles in
// stateDir. A bundle that cannot be read fails the pass (nothing is
// removed on a guess), one that is gone meanwhile does not.
func bundleRefs(stateDir, blobsDir, extracted string) func(context.Context) (map[string]bool, error) {
	return func(context.Context) (map[string]bool, error) {
		ents, err := os.ReadDir(stateDir)
		if errors.Is(err, os.ErrNotExist) {
			return map[string]bool{}, nil
		}
		if err != nil {
			return nil, err
		}
		out := map[string]bool{}
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join(stateDir, e.Name(), "bundle", "config.json"))
			if errors.Is(err, os.ErrNotExist) || !e.IsDir() {
				continue // no bundle (yet, or any more: a kept layer)
			}
			if err != nil {
				return nil, err
			}
			var spec struct {
				Mounts []struct {
					Source string `json:"source"`
				} `json:"mounts"`
			}
			if err := json.Unmarshal(b, &spec); err != nil {
				return nil, err
			}
			for _, m := range spec.Mounts {
				if d, ok := uploadDigestOf(m.Source, blobsDir, extracted); ok {
					out[d] = true
				}
			}
		}
		return out, nil
	}
}

// uploadDigestOf is the digest of the upload at path, if it is one
// (blobsDir/<hex> or extracted/<hex>).
func uploadDigestOf(path, blobsDir, extracted string) (string, bool) {
	for _, dir := range []string{blobsDir, extracted} {
		if dir == "" {
			continue
		}
		if rest, ok := strings.CutPrefix(filepath.Clean(path), filepath.Clean(dir)+"/"); ok && !strings.Contains(rest, "/") {
			d := "sha256:" + rest
			if len(rest) == 64 {
				return d, true
			}
		}
	}
	return "", false
}

// pendingMounts holds a node's copies sent for a start that has not run
// yet (PutMount, then Start): each PutMount pins its content until a Start
// binding it has run (its bundle then refers to it) or, for a create that
// failed in between, startWindow has passed.
type pendingMounts struct {
	blobs *imagebuild.Blobs
	mu    sync.Mutex
	held  map[string][]pendingPin // digest → oldest first
	now   func() time.Time
}

type pendingPin struct {
	release func()
	until   time.Time
}

// startWindow bounds a PutMount's pin when no Start follows.
const startWindow = 10 * time.Minute

// hold pins digest for a start to come; false if it is not stored.
func (p *pendingMounts) hold(digest string) bool {
	release, err := p.blobs.Pin(digest)
	if err != nil {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.expire()
	p.held[digest] = append(p.held[digest], pendingPin{release, p.now().Add(startWindow)})
	return true
}

// unhold drops the newest hold of digest (its PutMount failed after all).
func (p *pendingMounts) unhold(digest string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ps := p.held[digest]; len(ps) > 0 {
		ps[len(ps)-1].release()
		if p.held[digest] = ps[:len(ps)-1]; len(p.held[digest]) == 0 {
			delete(p.held, digest)
		}
	}
}

// started releases one pin of each upload the start bound.
func (p *pendingMounts) started(binds []sandbox.Bind, blobsDir, extracted string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, b := range binds {
		d, ok := uploadDigestOf(b.Source, blobsDir, extracted)
		if !ok || len(p.held[d]) == 0 {
			continue
		}
		p.held[d][0].release()
		if p.held[d] = p.held[d][1:]; len(p.held[d]) == 0 {
			delete(p.held, d)
		}
	}
	p.expire()
}

// refs expires the pins past their window (a uploadGC refs function:
// it refers to nothing itself).
func (p *pendingMounts) refs(context.Context) (map[string]bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.expire()
	return nil, nil
}

// expire releases the pins past their window; p.mu held.
func (p *pendingMounts) expire() {
	now := p.now()
	for d, ps := range p.held {
		for len(ps) > 0 && now.After(ps[0].until) {
			ps[0].release()
			ps = ps[1:]
		}
		if len(ps) == 0 {
			delete(p.held, d)
		} else {
			p.held[d] = ps
		}
	}
}
