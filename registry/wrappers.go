package registry

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"runtime/debug"
)

// The request and response wrappers of ociHandler, and recoverHandler.

// withPath returns a shallow copy of r for path p.
func withPath(r *http.Request, p string) *http.Request {
	r2 := r.Clone(r.Context())
	u := *r.URL
	u.Path, u.RawPath = p, ""
	r2.URL = &u
	r2.RequestURI = (&url.URL{Path: p, RawQuery: u.RawQuery}).RequestURI()
	return r2
}

// hookWriter calls hook with the status and headers just before they are
// written.
type hookWriter struct {
	http.ResponseWriter
	hook  func(status int, h http.Header)
	wrote bool
}

func (w *hookWriter) WriteHeader(code int) {
	if !w.wrote {
		w.wrote = true
		w.hook(code, w.Header())
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *hookWriter) Write(b []byte) (int, error) {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(b)
}

func (w *hookWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *hookWriter) Flush() {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

// statusWriter records the status written.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// ReadFrom keeps the underlying writer's io.ReaderFrom (sendfile for blob
// downloads) reachable through the wrapper.
func (w *statusWriter) ReadFrom(r io.Reader) (int64, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return io.Copy(w.ResponseWriter, r)
}

func (w *statusWriter) Flush() { _ = http.NewResponseController(w.ResponseWriter).Flush() }

// recoverHandler turns a panic while serving a request into a logged error
// and a 500 answer, where net/http would drop the connection and log at a
// level we do not show.
type recoverHandler struct {
	next http.Handler
	log  *slog.Logger
}

func (h *recoverHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	sw := &statusWriter{ResponseWriter: w}
	defer func() {
		p := recover()
		if p == nil {
			return
		}
		if p == http.ErrAbortHandler {
			panic(p)
		}
		h.log.Error("registry: panic serving a request", "method", r.Method, "path", r.URL.Path, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
		if sw.status == 0 {
			writeRegistryError(w, http.StatusInternalServerError, "UNKNOWN", "internal error")
			return
		}
		panic(http.ErrAbortHandler) // the answer is half written: the client must see it broken
	}()
	h.next.ServeHTTP(sw, r)
}
