package registry

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
)

// Tags in the embedded registry are immutable: once a tag names a manifest,
// a put of another manifest under it is refused (409, code DENIED) until the
// tag is deleted. Everything chalkd stores is meant to stay what it was when
// written: build cache keys are content hashes, seeded base images and
// pull-through copies are what the node runs. Putting the same manifest again
// is allowed (clients retry). Replacing a tag on purpose is a delete then a
// put, both with the push credential.

// maxManifestBytes bounds a manifest put; distribution refuses larger ones too.
const maxManifestBytes = 4 << 20

// manifestMediaTypes are what the tag probe accepts, so the registry answers
// with whatever kind of manifest the tag names.
var manifestMediaTypes = strings.Join([]string{
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.docker.distribution.manifest.v2+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
}, ", ")

// immutableTags refuses manifest puts that would move an existing tag.
type immutableTags struct {
	next http.Handler
	// mu serialises tag puts, so that two puts of different manifests to a
	// new tag cannot both see it free.
	mu sync.Mutex
}

// tagPut returns the repository and tag of a put of a manifest by tag.
func tagPut(r *http.Request) (repo, tag string, ok bool) {
	if r.Method != http.MethodPut {
		return "", "", false
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/v2/")
	if !ok {
		return "", "", false
	}
	i := strings.LastIndex(rest, "/manifests/")
	if i <= 0 {
		return "", "", false
	}
	repo, ref := rest[:i], rest[i+len("/manifests/"):]
	if ref == "" || strings.ContainsAny(ref, ":/") { // a digest, or not a reference at all
		return "", "", false
	}
	return repo, ref, true
}

func (h *immutableTags) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	repo, tag, ok := tagPut(r)
	if !ok {
		h.next.ServeHTTP(w, r)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxManifestBytes+1))
	if err != nil {
		writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID", "reading the manifest: "+err.Error())
		return
	}
	if len(body) > maxManifestBytes {
		writeRegistryError(w, http.StatusRequestEntityTooLarge, "SIZE_INVALID", "manifest too large")
		return
	}
	sum := sha256.Sum256(body)
	digest := "sha256:" + hex.EncodeToString(sum[:])

	h.mu.Lock()
	defer h.mu.Unlock()
	cur, err := h.current(r, repo, tag)
	if err != nil {
		// Fail closed: a tag whose state is unknown is not written.
		writeRegistryError(w, http.StatusServiceUnavailable, "UNAVAILABLE", err.Error())
		return
	}
	if cur != "" && cur != digest {
		writeRegistryError(w, http.StatusConflict, "DENIED",
			"tag "+repo+":"+tag+" is immutable: it names "+cur+" (delete it first to replace it)")
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	h.next.ServeHTTP(w, r)
}

// current returns the digest of the manifest repo:tag names, or "" if none.
func (h *immutableTags) current(r *http.Request, repo, tag string) (string, error) {
	req, err := http.NewRequestWithContext(r.Context(), http.MethodHead, "/v2/"+repo+"/manifests/"+tag, nil)
	if err != nil {
		return "", err
	}
	req.Host = r.Host
	req.Header.Set("Accept", manifestMediaTypes)
	rec := &headRecorder{header: http.Header{}}
	h.next.ServeHTTP(rec, req)
	switch rec.status {
	case http.StatusOK:
		if d := rec.header.Get("Docker-Content-Digest"); d != "" {
			return d, nil
		}
		return "", fmt.Errorf("tag %s:%s: no digest in the registry's answer", repo, tag)
	case http.StatusNotFound:
		return "", nil
	default:
		return "", fmt.Errorf("tag %s:%s: checking what it names: status %d", repo, tag, rec.status)
	}
}

// headRecorder is the http.ResponseWriter of internal probes: it keeps the
// status and headers and drops the body (or keeps its start).
type headRecorder struct {
	header http.Header
	status int
	// body, if not nil, keeps the first max bytes of the body.
	body *bytes.Buffer
	max  int
}

func (h *headRecorder) Header() http.Header { return h.header }

func (h *headRecorder) WriteHeader(code int) {
	if h.status == 0 {
		h.status = code
	}
}

func (h *headRecorder) Write(b []byte) (int, error) {
	h.WriteHeader(http.StatusOK)
	if h.body != nil && h.body.Len() < h.max {
		h.body.Write(b[:min(len(b), h.max-h.body.Len())])
	}
	return len(b), nil
}
