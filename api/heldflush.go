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
//
// The exec's start can be held too (holdNextFlush), for a caller that only
// waits for the end: the started event then goes out with the next message
// (the first output or the exit status) in one write, or by flushPending.
type heldFlushWriter struct {
	http.ResponseWriter
	held atomic.Bool
	// skipNext skips the next flush, which leaves pending set until a
	// flush happens. The handler serialises these with its sends.
	skipNext, pending bool
}

func (w *heldFlushWriter) Flush() {
	if w.held.Load() {
		return
	}
	if w.skipNext {
		w.skipNext, w.pending = false, true
		return
	}
	w.flush()
}

func (w *heldFlushWriter) flush() {
	w.pending = false
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

// holdNextFlush makes the next flush of the response of the request ctx
// belongs to a no-op: what was sent goes out with the next message, or
// with flushPending. The caller serialises it with its sends. It reports
// whether the response can hold (false outside withHeldFlush).
func holdNextFlush(ctx context.Context) bool {
	w, _ := ctx.Value(heldFlushKey{}).(*heldFlushWriter)
	if w == nil {
		return false
	}
	w.skipNext = true
	return true
}

// flushPending flushes what a held flush (holdNextFlush) left buffered, if
// nothing flushed it since. The caller serialises it with its sends and
// never calls it once the handler has returned.
func flushPending(ctx context.Context) {
	if w, _ := ctx.Value(heldFlushKey{}).(*heldFlushWriter); w != nil && w.pending && !w.held.Load() {
		w.flush()
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
