package metadata

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/internal/reqlimit"
)

// limitsEnv serves the metadata service as the daemon does: HTTPServer on
// Listener.
func limitsEnv(t *testing.T, l Limits) (*testEnv, string) {
	t.Helper()
	env := newEnv(t, Config{Limits: l})
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = env.md.HTTPServer()
	srv.Listener = env.md.Listener(srv.Listener)
	srv.Start()
	t.Cleanup(srv.Close)
	return env, srv.Listener.Addr().String()
}

// dialFrom opens a raw connection from src; reads fail after 10 s (a
// failure detector, not synchronisation).
func dialFrom(t *testing.T, src netip.Addr, addr string) net.Conn {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	return c
}

// get sends one keep-alive GET /v1/identity on c and returns the status
// (0: the connection was closed or reset instead).
func get(t *testing.T, c net.Conn, br *bufio.Reader, extra string) int {
	t.Helper()
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n%s: %s\r\n%s\r\n", IdentityPath, FlavorHeader, FlavorValue, extra)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// waitClosed reads c until the server closes it; it fails if the read
// deadline passes first.
func waitClosed(t *testing.T, c net.Conn, what string) {
	t.Helper()
	_, err := io.Copy(io.Discard, c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("%s: the server did not close the connection", what)
	}
}

// TestConnsPerSandbox: one sandbox cannot hold more than its cap of
// connections (the 28k idle keep-alives of issue #14); another sandbox is
// unaffected; a closed connection frees its place.
func TestConnsPerSandbox(t *testing.T) {
	_, addr := limitsEnv(t, Limits{ConnsPerSandbox: 4})
	var held []net.Conn
	for i := 0; i < 4; i++ {
		c := dialFrom(t, addrA, addr)
		if code := get(t, c, bufio.NewReader(c), ""); code != 200 {
			t.Fatalf("connection %d of A: %d", i, code)
		}
		held = append(held, c)
	}
	over := dialFrom(t, addrA, addr)
	if code := get(t, over, bufio.NewReader(over), ""); code == 200 {
		t.Fatal("a fifth connection of A was served")
	}
	for i := 0; i < 4; i++ {
		c := dialFrom(t, addrB, addr)
		if code := get(t, c, bufio.NewReader(c), ""); code != 200 {
			t.Fatalf("connection %d of B while A is at its cap: %d", i, code)
		}
	}
	// The server closes one of A's (Connection: close); once it has, A may
	// open another.
	br := bufio.NewReader(held[0])
	if code := get(t, held[0], br, "Connection: close\r\n"); code != 200 {
		t.Fatalf("closing request: %d", code)
	}
	waitClosed(t, held[0], "Connection: close")
	again := dialFrom(t, addrA, addr)
	if code := get(t, again, bufio.NewReader(again), ""); code != 200 {
		t.Fatalf("A after one of its connections closed: %d", code)
	}
}

// TestHeaderAndIdleTimeouts: a sandbox that sends half a request, or sends
// nothing more after a response, loses the connection.
func TestHeaderAndIdleTimeouts(t *testing.T) {
	_, addr := limitsEnv(t, Limits{ReadHeaderTimeout: 100 * time.Millisecond, IdleTimeout: 100 * time.Millisecond})
	c := dialFrom(t, addrA, addr)
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n", IdentityPath)
	waitClosed(t, c, "half a header")
	c = dialFrom(t, addrA, addr)
	if code := get(t, c, bufio.NewReader(c), ""); code != 200 {
		t.Fatalf("status %d", code)
	}
	waitClosed(t, c, "idle keep-alive")
}

// TestBodyRate: a body that stalls is cut at its deadline; a long response
// after a complete body is not (exec and SSE streams).
func TestBodyRate(t *testing.T) {
	env, addr := limitsEnv(t, Limits{BodyRate: reqlimit.Rate{Grace: 100 * time.Millisecond, PerSecond: 1024}})
	proceed := make(chan struct{})
	env.md.Handle("POST /test/echo", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		w.Write([]byte("a\n"))
		w.(http.Flusher).Flush()
		select {
		case <-proceed:
		case <-r.Context().Done():
			return
		}
		w.Write([]byte("b\n"))
	}), WithoutFlavorHeader())

	c := dialFrom(t, addrA, addr)
	fmt.Fprintf(c, "POST /test/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("a stalled body was not cut at its deadline")
	}
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Fatal("a stalled body was accepted")
		}
	}

	c = dialFrom(t, addrA, addr)
	fmt.Fprintf(c, "POST /test/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
	br := bufio.NewReader(c)
	resp, err = http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("complete body: %v %v", resp, err)
	}
	rd := bufio.NewReader(resp.Body)
	if l, err := rd.ReadString('\n'); l != "a\n" {
		t.Fatalf("first line %q %v", l, err)
	}
	// Well past the body's deadline (grace + 2 bytes at 1 KiB/s), the
	// response goes on.
	<-time.After(500 * time.Millisecond)
	close(proceed)
	if l, err := rd.ReadString('\n'); l != "b\n" {
		t.Fatalf("the response was cut after the body deadline: %q %v", l, err)
	}
}

// TestInFlightPerSandbox: a sandbox's body bytes in flight are bounded (429,
// nothing read); another sandbox is unaffected.
func TestInFlightPerSandbox(t *testing.T) {
	env, addr := limitsEnv(t, Limits{InFlightPerSandbox: 1 << 20})
	entered, hold := make(chan struct{}, 2), make(chan struct{})
	env.md.Handle("POST /test/hold", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		<-hold
		io.Copy(io.Discard, r.Body)
	}), WithoutFlavorHeader())
	defer close(hold)
	send := func(src netip.Addr) net.Conn {
		c := dialFrom(t, src, addr)
		fmt.Fprintf(c, "POST /test/hold HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", 800<<10)
		return c
	}
	send(addrA)
	<-entered
	c := send(addrA)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("second body of A: %v %v", resp, err)
	}
	send(addrB)
	<-entered
}
