// Package reqlimit bounds what an HTTP caller can make a server hold: the
// request body bytes it has in flight (Budget, per caller and in total) and
// how slowly a body may arrive (BodyDeadline). Both act before the handler
// reads a byte of the body; callers are authenticated or identified first.
// Clip cuts a value a caller chose to a bound before it is stored or quoted.
package reqlimit

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Errors of Admit, both errdefs.ErrResourceExhausted.
var (
	// ErrTooLarge: the body is larger than one request may be.
	ErrTooLarge = fmt.Errorf("request body too large: %w", errdefs.ErrResourceExhausted)
	// ErrBusy: the caller (or all callers together) already has as many
	// body bytes in flight as allowed; retry when earlier requests finish.
	ErrBusy = fmt.Errorf("too many request bytes in flight: %w", errdefs.ErrResourceExhausted)
)

// Budget counts request body bytes in flight per caller and in total. A
// request's bytes count from Admit until its release: its declared
// Content-Length is reserved up front (refused without reading if it does
// not fit), a body of unknown length is charged as it is read (a read that
// does not fit fails with ErrBusy).
type Budget struct {
	perCaller, total int64

	mu   sync.Mutex
	used map[string]int64
	all  int64
}

// NewBudget returns a Budget allowing perCaller bytes in flight per caller
// and total across callers (0: no total bound).
func NewBudget(perCaller, total int64) *Budget {
	return &Budget{perCaller: perCaller, total: total, used: map[string]int64{}}
}

func (b *Budget) take(caller string, n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used[caller]+n > b.perCaller || (b.total > 0 && b.all+n > b.total) {
		return false
	}
	b.used[caller] += n
	b.all += n
	return true
}

func (b *Budget) give(caller string, n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.all -= n
	if b.used[caller] -= n; b.used[caller] <= 0 {
		delete(b.used, caller)
	}
}

// InFlight reports the bytes a caller has in flight.
func (b *Budget) InFlight(caller string) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used[caller]
}

// Admit charges r's body to caller, replacing r.Body with a metered body,
// and returns the function that gives the bytes back (call it when the
// handler has returned). maxBody (0: none) bounds one request's body. It
// reads nothing: a declared length that is too large or does not fit is
// refused at once (ErrTooLarge, ErrBusy).
func (b *Budget) Admit(caller string, r *http.Request, maxBody int64) (release func(), err error) {
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return func() {}, nil
	}
	m := &meteredBody{rc: r.Body, b: b, caller: caller, max: maxBody}
	if r.ContentLength > 0 {
		if maxBody > 0 && r.ContentLength > maxBody {
			return nil, ErrTooLarge
		}
		if !b.take(caller, r.ContentLength) {
			return nil, ErrBusy
		}
		m.reserved, m.charged = true, r.ContentLength
	}
	r.Body = m
	return m.release, nil
}

// meteredBody charges what is read of a body of unknown length (a declared
// length is reserved whole; net/http enforces it).
type meteredBody struct {
	rc       io.ReadCloser
	b        *Budget
	caller   string
	max      int64
	reserved bool

	mu      sync.Mutex
	charged int64
	done    bool
}

func (m *meteredBody) Read(p []byte) (int, error) {
	n, err := m.rc.Read(p)
	if m.reserved || n == 0 {
		return n, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.done {
		return 0, ErrBusy
	}
	if m.max > 0 && m.charged+int64(n) > m.max {
		return 0, ErrTooLarge
	}
	if !m.b.take(m.caller, int64(n)) {
		return 0, ErrBusy
	}
	m.charged += int64(n)
	return n, err
}

func (m *meteredBody) Close() error { return m.rc.Close() }

func (m *meteredBody) release() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.done {
		m.done = true
		m.b.give(m.caller, m.charged)
	}
}

// Rate is a minimum body rate: a body must arrive within Grace plus its
// size at PerSecond bytes per second.
type Rate struct {
	Grace     time.Duration
	PerSecond int64
}

// BodyDeadline makes r's body arrive at Rate or fail: every read of it runs
// under a connection read deadline of start + Grace + (bytes so far + the
// read's size) / PerSecond. Once the body ends (EOF) the deadline is lifted,
// so a long response (an exec stream, an SSE stream) is never cut by it.
// Requests without a body are left alone (net/http watches their
// connection for a close by then, under no deadline).
func BodyDeadline(w http.ResponseWriter, r *http.Request, rate Rate) {
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 || rate.PerSecond <= 0 {
		return
	}
	r.Body = &deadlineBody{rc: r.Body, ctl: http.NewResponseController(w), start: time.Now(), rate: rate}
}

type deadlineBody struct {
	rc    io.ReadCloser
	ctl   *http.ResponseController
	start time.Time
	rate  Rate
	read  int64
	ended bool
}

func (d *deadlineBody) Read(p []byte) (int, error) {
	if d.ended {
		return d.rc.Read(p)
	}
	allow := d.rate.Grace + time.Duration((d.read+int64(len(p)))*int64(time.Second)/d.rate.PerSecond)
	_ = d.ctl.SetReadDeadline(d.start.Add(allow))
	n, err := d.rc.Read(p)
	d.read += int64(n)
	if errors.Is(err, io.EOF) {
		d.ended = true
		_ = d.ctl.SetReadDeadline(time.Time{})
	}
	return n, err
}

func (d *deadlineBody) Close() error { return d.rc.Close() }

// Clip cuts s to at most n bytes at a rune boundary, marking a cut with
// "…": for a value a client or a sandbox chose, stored or quoted whole
// otherwise (an audit record's fields, an error's quote).
func Clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}
