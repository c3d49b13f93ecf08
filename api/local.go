package api

import (
	"fmt"
	"io"
	"net/http"
	"sync"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// LocalTransport returns an http.RoundTripper that serves Connect requests
// in-process with the API's services (for a generated Connect client in
// chalkd itself, such as the web console's terminal relay). The caller is
// the principal in each request's context (WithPrincipal); a request
// without one is refused. Authorisation, validation and auditing are those
// of any API call; the per-caller body budget is not applied (the caller
// built the request in-process).
func (s *Server) LocalTransport() http.RoundTripper { return localTransport{s.services()} }

type localTransport struct{ h http.Handler }

func (t localTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if _, ok := PrincipalFrom(req.Context()); !ok {
		return nil, fmt.Errorf("in-process API call without a principal: %w", errdefs.ErrUnauthenticated)
	}
	if req.Body == nil {
		req.Body = http.NoBody
	}
	pr, pw := io.Pipe()
	w := &pipeWriter{header: http.Header{}, body: pw, ready: make(chan struct{})}
	go func() {
		defer func() {
			w.writeHeader(http.StatusOK)
			_ = pw.Close()
		}()
		t.h.ServeHTTP(w, req)
	}()
	select {
	case <-w.ready:
	case <-req.Context().Done():
		_ = pr.CloseWithError(req.Context().Err())
		return nil, req.Context().Err()
	}
	return &http.Response{
		Status: http.StatusText(w.code), StatusCode: w.code, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: w.sent, Body: pr, ContentLength: -1, Request: req,
	}, nil
}

// pipeWriter is an http.ResponseWriter whose body streams into a pipe; the
// response is handed to the client once the header is written.
type pipeWriter struct {
	header http.Header
	body   *io.PipeWriter
	once   sync.Once
	ready  chan struct{}
	code   int
	sent   http.Header
}

var (
	_ http.ResponseWriter = (*pipeWriter)(nil)
	_ http.Flusher        = (*pipeWriter)(nil)
)

func (w *pipeWriter) Header() http.Header { return w.header }

func (w *pipeWriter) WriteHeader(code int) { w.writeHeader(code) }

func (w *pipeWriter) writeHeader(code int) {
	w.once.Do(func() {
		w.code, w.sent = code, w.header.Clone()
		close(w.ready)
	})
}

func (w *pipeWriter) Write(b []byte) (int, error) {
	w.writeHeader(http.StatusOK)
	return w.body.Write(b)
}

func (w *pipeWriter) Flush() { w.writeHeader(http.StatusOK) }
