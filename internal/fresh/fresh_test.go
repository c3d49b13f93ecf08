package fresh

import (
	"io"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
)

// TestTransport: requests share a connection until the generation changes
// (or Renew): the next one goes over a new connection.
func TestTransport(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, r.RemoteAddr)
	}))
	srv.Start()
	defer srv.Close()
	var gen atomic.Uint64
	f := New(&http.Transport{}, gen.Load)
	c := &http.Client{Transport: f}
	get := func() string {
		t.Helper()
		res, err := c.Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return string(b)
	}
	a, b := get(), get()
	if a != b {
		t.Fatalf("two requests, two connections (%s, %s): want one kept alive", a, b)
	}
	gen.Add(1)
	c2 := get()
	if c2 == b {
		t.Fatal("after the generation changed, the old connection was used")
	}
	if get() != c2 {
		t.Fatal("the new connection was not kept")
	}
	f.Renew()
	if get() == c2 {
		t.Fatal("after Renew, the old connection was used")
	}
}
