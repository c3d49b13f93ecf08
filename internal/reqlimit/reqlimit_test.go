package reqlimit

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestBudget: declared lengths are reserved before reading, unknown lengths
// charged as read; everything is given back on release.
func TestBudget(t *testing.T) {
	b := NewBudget(1000, 1500)
	req := func(n int, declared bool) *httptestReq {
		r := httptest.NewRequest("POST", "/", io.NopCloser(strings.NewReader(strings.Repeat("x", n))))
		r.ContentLength = -1
		if declared {
			r.ContentLength = int64(n)
		}
		return &httptestReq{r}
	}
	r1 := req(600, true)
	rel1, err := b.Admit("a", r1.Request, 0)
	if err != nil || b.InFlight("a") != 600 {
		t.Fatalf("admit 600: %v, in flight %d", err, b.InFlight("a"))
	}
	if _, err := b.Admit("a", req(600, true).Request, 0); !errors.Is(err, ErrBusy) {
		t.Fatalf("over the caller's budget: %v", err)
	}
	if _, err := b.Admit("a", req(600, true).Request, 500); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("over the request bound: %v", err)
	}
	// Unknown length: charged as read, refused when it no longer fits.
	r2 := req(600, false)
	rel2, err := b.Admit("a", r2.Request, 0)
	if err != nil || b.InFlight("a") != 600 {
		t.Fatalf("unknown length admitted with a charge: %v %d", err, b.InFlight("a"))
	}
	if _, err := io.ReadAll(r2.Body); !errors.Is(err, ErrBusy) {
		t.Fatalf("reading past the budget: %v", err)
	}
	if b.InFlight("a") > 1000 {
		t.Fatalf("in flight %d over the budget", b.InFlight("a"))
	}
	// Another caller, bounded by the total.
	r3 := req(950, false) // within b's 1000, not within the 1500 total beside a's 600
	rel3, err := b.Admit("b", r3.Request, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(r3.Body); !errors.Is(err, ErrBusy) {
		t.Fatalf("reading past the total: %v", err)
	}
	for _, rel := range []func(){rel1, rel2, rel3, rel1} {
		rel()
	}
	if b.InFlight("a") != 0 || b.InFlight("b") != 0 || b.all != 0 {
		t.Fatalf("left charged: a %d b %d all %d", b.InFlight("a"), b.InFlight("b"), b.all)
	}
	// A body after its release is not charged again.
	if n, err := r2.Body.Read(make([]byte, 10)); n != 0 || err == nil {
		t.Fatalf("read after release: %d %v", n, err)
	}
}

type httptestReq struct{ *http.Request }
