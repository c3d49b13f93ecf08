package registry

import (
	"net/http"
	"sync"
	"sync/atomic"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// maxCachedRefs bounds the tag cache; when it is full it starts over.
const maxCachedRefs = 4096

// tagCache remembers what Resolve found in the embedded registry (a local
// reference's platform digest), so that a create does not ask the registry
// over HTTP for a tag it asked about a moment ago (issue #18: 0.6–0.75 ms of
// every claim).
//
// Invalidation: every request that may change the registry's storage (any
// method but GET, HEAD and OPTIONS, on either listener) moves the
// generation on, before its answer is written and again once it has been
// handled; an entry serves only while the generation is the one read before
// the request that found it. So a tag pushed again (delete, then put) or an
// image removed is seen by the first Resolve after the write's answer, and a
// Resolve racing a write can at worst store an entry that is already stale.
// This holds only when nothing else writes the storage: Config.CacheTags
// says so (not for replicas sharing the storage, nor a remote registry).
type tagCache struct {
	gen atomic.Uint64
	mu  sync.Mutex
	m   map[string]tagEntry
}

type tagEntry struct {
	digest v1.Hash
	gen    uint64
}

func newTagCache() *tagCache { return &tagCache{m: map[string]tagEntry{}} }

// generation is read before asking the registry; put is given it.
func (c *tagCache) generation() uint64 { return c.gen.Load() }

func (c *tagCache) invalidate() { c.gen.Add(1) }

func (c *tagCache) get(ref string) (v1.Hash, bool) {
	c.mu.Lock()
	e, ok := c.m[ref]
	c.mu.Unlock()
	if !ok || e.gen != c.gen.Load() {
		return v1.Hash{}, false
	}
	return e.digest, true
}

// put records what ref named when the registry was asked at generation gen.
func (c *tagCache) put(ref string, gen uint64, d v1.Hash) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen.Load() {
		return // a write came in meanwhile: the answer may be stale already
	}
	if len(c.m) >= maxCachedRefs {
		clear(c.m)
	}
	c.m[ref] = tagEntry{digest: d, gen: gen}
}

// watch moves the generation on around every request that may write.
func (c *tagCache) watch(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet, http.MethodHead, http.MethodOptions:
			next.ServeHTTP(w, r)
			return
		}
		defer c.invalidate()
		next.ServeHTTP(&invalidatingWriter{ResponseWriter: w, c: c}, r)
	})
}

// invalidatingWriter moves the generation on before any of the answer can
// reach the client: a client that saw its write answered never gets an
// entry from before it.
type invalidatingWriter struct {
	http.ResponseWriter
	c *tagCache
}

func (w *invalidatingWriter) WriteHeader(code int) {
	w.c.invalidate()
	w.ResponseWriter.WriteHeader(code)
}

func (w *invalidatingWriter) Write(b []byte) (int, error) {
	w.c.invalidate()
	return w.ResponseWriter.Write(b)
}

func (w *invalidatingWriter) Flush() {
	w.c.invalidate()
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *invalidatingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
