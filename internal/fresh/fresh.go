// Package fresh is an HTTP transport that moves to new connections when a
// generation changes: a fleet node after renewing its certificate (new
// connections present the new one), the control plane after a node's
// renewal (new connections verify the node's new certificate).
package fresh

import (
	"net/http"
	"sync"
	"sync/atomic"
)

// Transport is an http.RoundTripper over an *http.Transport. When gen
// (checked at every request) differs from what it was when the transport
// in use was made, or at Renew, the transport is replaced by a clone: the
// request and those after it go over new connections (new TLS handshakes),
// and the old transport's idle connections are closed. A request already
// running on an old connection finishes there; the connection then idles
// unused until the old transport's IdleConnTimeout closes it.
type Transport struct {
	gen func() uint64 // nil: only Renew replaces the transport
	mu  sync.Mutex
	cur atomic.Pointer[http.Transport]
	at  atomic.Uint64 // gen() when cur was made
}

// New is a Transport starting with t; gen may be nil.
func New(t *http.Transport, gen func() uint64) *Transport {
	f := &Transport{gen: gen}
	if gen != nil {
		f.at.Store(gen())
	}
	f.cur.Store(t)
	return f
}

// RoundTrip sends r over the current transport.
func (f *Transport) RoundTrip(r *http.Request) (*http.Response, error) {
	if f.gen != nil {
		if g := f.gen(); g != f.at.Load() {
			f.renew(g, false)
		}
	}
	return f.cur.Load().RoundTrip(r)
}

// Renew replaces the transport now (new requests, new connections).
func (f *Transport) Renew() {
	var g uint64
	if f.gen != nil {
		g = f.gen()
	}
	f.renew(g, true)
}

func (f *Transport) renew(g uint64, force bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !force && f.at.Load() == g {
		return // another request replaced it meanwhile
	}
	old := f.cur.Load()
	f.cur.Store(old.Clone())
	f.at.Store(g)
	old.CloseIdleConnections()
}

// CloseIdleConnections closes the current transport's idle connections.
func (f *Transport) CloseIdleConnections() { f.cur.Load().CloseIdleConnections() }

// Current is the transport in use (tests).
func (f *Transport) Current() *http.Transport { return f.cur.Load() }
