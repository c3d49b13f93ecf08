package api

import (
	"context"
	"net/http"
	"sync/atomic"

	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
)

// heldFlushWriter lets a streaming handler send its last message without a
// flush of its own. Connect flushes the response after every message it
// sends and again after the end of the stream; for an exec's exit status
// that made three writes to the client's connection (the status, the
// end-of-stream message, the chunked body's terminator), each waking the
// client. Once held, flushes are skipped and the HTTP server writes
// whatever is buffered in one write when the handler returns, which it
// always does right after its last message. Messages before the hold (the
// exec's start, its output) are flushed as they are sent.
type heldFlushWriter struct {
	http.ResponseWriter
	held atomic.Bool
}

func (w *heldFlushWriter) Flush() {
	if w.held.Load() {
		return
	}
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the connection's own writer.
func (w *heldFlushWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

type heldFlushKey struct{}

// holdFlushes makes the rest of the response of the request ctx belongs to
// go out when its handler returns, not message by message. The caller must
// send nothing after it but its last message. A no-op outside
// withHeldFlush.
func holdFlushes(ctx context.Context) {
	if w, _ := ctx.Value(heldFlushKey{}).(*heldFlushWriter); w != nil {
		w.held.Store(true)
	}
}

// withHeldFlush serves Exec's requests with a writer whose flushes its
// handler can hold back (holdFlushes); other calls are served as they are.
func withHeldFlush(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != computev1connect.SandboxServiceExecProcedure {
			next.ServeHTTP(w, r)
			return
		}
		hw := &heldFlushWriter{ResponseWriter: w}
		next.ServeHTTP(hw, r.WithContext(context.WithValue(r.Context(), heldFlushKey{}, hw)))
	})
}
