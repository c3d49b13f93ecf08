package registry

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"runtime/debug"
	"strconv"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

// Blob uploads distribution does not do itself (oci.go): in one request,
// and mounts of blobs addressed by sha512.

// postUpload serves a single-request blob upload (POST
// /v2/<name>/blobs/uploads/?digest=<digest> with the blob as body), which
// distribution does not implement, as the POST and PUT it does implement.
func (h *ociHandler) postUpload(w http.ResponseWriter, r *http.Request, rt route) {
	d, err := digest.Parse(r.URL.Query().Get("digest"))
	if err != nil {
		writeRegistryError(w, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("digest %q: %v", r.URL.Query().Get("digest"), err))
		return
	}
	h.upload(w, r, rt.name, d, r.Body, r.ContentLength)
}

// upload stores body as blob d of repository name, answering w as the
// completion of an upload: a POST opening an upload session, then a PUT of
// body closing it, both through distribution.
func (h *ociHandler) upload(w http.ResponseWriter, r *http.Request, name string, d digest.Digest, body io.Reader, size int64) {
	post, err := http.NewRequestWithContext(r.Context(), http.MethodPost, "/v2/"+name+"/blobs/uploads/", nil)
	if err != nil {
		h.fail(w, "starting an upload", err)
		return
	}
	post.Host = r.Host
	rec := &headRecorder{header: http.Header{}}
	h.next.ServeHTTP(rec, post)
	if rec.status != http.StatusAccepted {
		writeRegistryError(w, rec.status, "UNKNOWN", fmt.Sprintf("starting an upload: status %d", rec.status))
		return
	}
	loc, err := url.Parse(rec.header.Get("Location"))
	if err != nil || loc.Path == "" {
		h.fail(w, "starting an upload", fmt.Errorf("bad upload location %q", rec.header.Get("Location")))
		return
	}
	q := loc.Query()
	q.Set("digest", d.String())
	put, err := http.NewRequestWithContext(r.Context(), http.MethodPut, (&url.URL{Path: loc.Path, RawQuery: q.Encode()}).String(), body)
	if err != nil {
		h.fail(w, "uploading", err)
		return
	}
	put.Host = r.Host
	put.ContentLength = size
	put.Header.Set("Content-Type", "application/octet-stream")
	h.next.ServeHTTP(asDigest(w, d, http.StatusCreated, "/v2/"+name+"/blobs/"+d.String()), put)
}

// mountCopy mounts blob d (not sha256) of repository from into rt.name.
// distribution would link only the blob's sha256 into rt.name, leaving d
// unknown there; instead the blob is uploaded again from the source (its
// data is stored once: blobs are kept by content). A source without the
// blob gets an upload session, as the spec asks of a mount that cannot be
// done.
func (h *ociHandler) mountCopy(w http.ResponseWriter, r *http.Request, rt route, d digest.Digest, from string) {
	if _, err := reference.WithName(from); err != nil {
		writeRegistryError(w, http.StatusBadRequest, "NAME_INVALID", fmt.Sprintf("repository name %q is invalid", from))
		return
	}
	get, err := http.NewRequestWithContext(r.Context(), http.MethodGet, "/v2/"+from+"/blobs/"+d.String(), nil)
	if err != nil {
		h.fail(w, "mounting", err)
		return
	}
	get.Host = r.Host
	pr, pw := io.Pipe()
	src := &pipeResponse{header: http.Header{}, pw: pw, status: make(chan int, 1)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer func() {
			// Off the request's goroutine, recoverHandler cannot catch a
			// panic: it would end chalkd.
			if p := recover(); p != nil {
				h.log.Error("registry: panic reading a blob to mount", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
				src.WriteHeader(http.StatusInternalServerError)
				_ = pw.CloseWithError(fmt.Errorf("reading %s: internal error", d))
			}
		}()
		h.next.ServeHTTP(src, get)
		src.WriteHeader(http.StatusOK) // nothing written: an empty answer
		_ = pw.Close()
	}()
	defer func() {
		_ = pr.Close() // stops the source if the upload did not read it all
		<-done
	}()
	if status := <-src.status; status != http.StatusOK {
		// Not mountable: an upload session instead.
		h.next.ServeHTTP(w, withQuery(r, ""))
		return
	}
	size := int64(-1)
	if n, err := strconv.ParseInt(src.header.Get("Content-Length"), 10, 64); err == nil {
		size = n
	}
	h.upload(w, r, rt.name, d, pr, size)
}

// withQuery returns a shallow copy of r with query q.
func withQuery(r *http.Request, q string) *http.Request {
	r2 := r.Clone(r.Context())
	u := *r.URL
	u.RawQuery = q
	r2.URL = &u
	r2.RequestURI = u.RequestURI()
	return r2
}

// pipeResponse is the http.ResponseWriter of an internal read whose body is
// streamed into a pipe.
type pipeResponse struct {
	header http.Header
	pw     *io.PipeWriter
	status chan int
	wrote  bool
}

func (p *pipeResponse) Header() http.Header { return p.header }

func (p *pipeResponse) WriteHeader(code int) {
	if !p.wrote {
		p.wrote = true
		p.status <- code
	}
}

func (p *pipeResponse) Write(b []byte) (int, error) {
	p.WriteHeader(http.StatusOK)
	return p.pw.Write(b)
}
