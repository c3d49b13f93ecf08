package mcpgw

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func testH1(headerTimeout time.Duration) *h1Transport {
	d := &net.Dialer{}
	return newH1Transport(d.DialContext, http.DefaultTransport, headerTimeout)
}

func h1Get(t *testing.T, rt http.RoundTripper, method, url, body string, hdr http.Header) (*http.Response, string) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp, string(b)
}

// The connection is kept for the next request after a body read to its
// end (chunked or sized), and not after "Connection: close" or a body
// closed before its end; what each request sent and got is intact.
func TestH1KeepAlive(t *testing.T) {
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if r.Header.Get("X-Auth") != "cred" || r.Header.Get("Content-Type") != "application/json" {
			w.WriteHeader(400)
			return
		}
		switch r.URL.Path {
		case "/sized":
			w.Header().Set("Content-Length", "4")
			_, _ = w.Write([]byte("size"))
		case "/close":
			w.Header().Set("Connection", "close")
			_, _ = w.Write(b)
		case "/long":
			for range 64 {
				_, _ = w.Write(bytes.Repeat([]byte("x"), 1024))
				w.(http.Flusher).Flush()
			}
		default:
			w.(http.Flusher).Flush() // chunked
			_, _ = w.Write(append([]byte("echo "), b...))
		}
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	rt := testH1(time.Minute)
	hdr := http.Header{"X-Auth": {"cred"}, "Content-Type": {"application/json"}}
	for i := range 5 {
		if resp, b := h1Get(t, rt, "POST", srv.URL+"/", `{"n":1}`, hdr); resp.StatusCode != 200 || b != `echo {"n":1}` {
			t.Fatalf("%d: %d %q", i, resp.StatusCode, b)
		}
		if resp, b := h1Get(t, rt, "GET", srv.URL+"/sized", "", hdr); resp.StatusCode != 200 || b != "size" {
			t.Fatalf("%d: %d %q", i, resp.StatusCode, b)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("%d connections for 10 sequential requests, want 1", n)
	}
	if _, b := h1Get(t, rt, "POST", srv.URL+"/close", `{}`, hdr); b != `{}` {
		t.Fatalf("close: %q", b)
	}
	if _, b := h1Get(t, rt, "POST", srv.URL+"/", `{}`, hdr); b != `echo {}` || conns.Load() != 2 {
		t.Fatalf("after Connection: close: %q, %d connections, want a second", b, conns.Load())
	}
	// A body closed before its end: the connection goes, the next request
	// gets its own answer on a new one (not the rest of the last).
	req, _ := http.NewRequest("GET", srv.URL+"/long", nil)
	req.Header = hdr.Clone()
	resp, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if _, err := resp.Body.Read(make([]byte, 1)); err == nil {
		t.Fatal("read after Close succeeded")
	}
	if _, b := h1Get(t, rt, "POST", srv.URL+"/", `{"after":1}`, hdr); b != `echo {"after":1}` || conns.Load() != 3 {
		t.Fatalf("after an early close: %q, %d connections, want 3", b, conns.Load())
	}
}

// rawUpstream accepts connections and hands each to serve.
func rawUpstream(t *testing.T, serve func(c net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); defer c.Close(); serve(c) }()
		}
	}()
	return "http://" + ln.Addr().String()
}

// A header name or value that would end the line (CR, LF, NUL, other
// controls) is refused before anything is written: the sandbox's headers
// that are passed on cannot add headers or a second request.
func TestH1RefusesInjection(t *testing.T) {
	var got atomic.Int32
	up := rawUpstream(t, func(c net.Conn) {
		if n, _ := c.Read(make([]byte, 1)); n > 0 {
			got.Add(1)
		}
	})
	rt := testH1(time.Minute)
	for _, h := range []http.Header{
		{"Mcp-Name": {"x\r\nAuthorization: Bearer stolen"}},
		{"Mcp-Name": {"x\nX: y"}},
		{"Mcp-Name": {"x\x00"}},
		{"Mcp-Name": {"x\x7f"}},
		{"Mcp-Param-A\r\nX": {"y"}},
		{"Mcp Param": {"y"}},
		{"Mcp-Param:": {"y"}},
	} {
		req, _ := http.NewRequest("POST", up+"/", strings.NewReader("{}"))
		req.Header = h
		if resp, err := rt.RoundTrip(req); err == nil {
			resp.Body.Close()
			t.Fatalf("%q: sent", h)
		}
	}
	for _, host := range []string{"a\r\nb", "a b\x01", "a b", " "} {
		req, _ := http.NewRequest("GET", up+"/", nil)
		req.Host = host
		if resp, err := rt.RoundTrip(req); err == nil {
			resp.Body.Close()
			t.Fatalf("host %q: sent", host)
		}
	}
	// A space or tab in the request target would split the request line
	// (found by FuzzH1Request: a raw query of " ").
	for _, q := range []string{" ", "a HTTP/1.0", "a\tb"} {
		u := mustURL(t, up+"/")
		u.RawQuery = q
		if resp, err := rt.RoundTrip(&http.Request{Method: "POST", URL: u, Header: http.Header{}, Body: io.NopCloser(strings.NewReader("{}")), ContentLength: 2}); err == nil {
			resp.Body.Close()
			t.Fatalf("query %q: sent", q)
		}
	}
	// Tabs and visible characters pass.
	b, err := appendRequest(nil, &http.Request{Method: "POST", URL: mustURL(t, up+"/p?q=1"), Header: http.Header{"Mcp-Name": {"a\tb ü"}, "Transfer-Encoding": {"chunked"}, "Content-Length": {"9"}}}, "h", 2)
	if err != nil {
		t.Fatal(err)
	}
	if want := "POST /p?q=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: chalk-mcp-gateway\r\nContent-Length: 2\r\nMcp-Name: a\tb ü\r\n\r\n"; string(b) != want {
		t.Fatalf("%q\nwant %q (the framing headers are the transport's own)", b, want)
	}
	if got.Load() != 0 {
		t.Fatalf("%d refused requests reached the upstream", got.Load())
	}
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	req, err := http.NewRequest("GET", s, nil)
	if err != nil {
		t.Fatal(err)
	}
	return req.URL
}

// An upstream's headers are bounded; an upstream that does not answer
// times out (as context.DeadlineExceeded: the gateway answers 504); the
// sandbox's request ending ends the wait.
func TestH1HostileUpstreams(t *testing.T) {
	endless := rawUpstream(t, func(c net.Conn) {
		_, _ = bufio.NewReader(c).ReadString('\n')
		_, _ = c.Write([]byte("HTTP/1.1 200 OK\r\n"))
		line := []byte("X-A: " + strings.Repeat("a", 1000) + "\r\n")
		for {
			if _, err := c.Write(line); err != nil {
				return
			}
		}
	})
	rt := testH1(time.Minute)
	req, _ := http.NewRequest("GET", endless+"/", nil)
	if resp, err := rt.RoundTrip(req); !errors.Is(err, errHeaderTooLong) {
		if err == nil {
			resp.Body.Close()
		}
		t.Fatalf("endless headers: %v", err)
	}

	quiet := rawUpstream(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) })
	rt = testH1(50 * time.Millisecond)
	req, _ = http.NewRequest("GET", quiet+"/", nil)
	if _, err := rt.RoundTrip(req); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("silent upstream: %v", err)
	}

	// An upstream that reads nothing: the write is bounded too.
	deaf := rawUpstream(t, func(c net.Conn) { _, _ = c.Read(make([]byte, 0)); <-t.Context().Done() })
	rt = testH1(50 * time.Millisecond)
	req, _ = http.NewRequest("POST", deaf+"/", bytes.NewReader(make([]byte, 64<<20)))
	if _, err := rt.RoundTrip(req); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("deaf upstream: %v", err)
	}

	rt = testH1(time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ = http.NewRequestWithContext(ctx, "GET", quiet+"/", nil)
	done := make(chan error, 1)
	go func() { _, err := rt.RoundTrip(req); done <- err }()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
}

// A kept-alive connection the upstream closed while it was idle is
// noticed before it is reused (with probeAfter 0, always): the request
// goes on a new connection.
func TestH1UpstreamClosedIdle(t *testing.T) {
	var conns atomic.Int32
	url := rawUpstream(t, func(c net.Conn) {
		conns.Add(1)
		br := bufio.NewReader(c)
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, req.Body)
		// Kept alive as far as the headers say, then closed.
		_, _ = c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
	})
	rt := testH1(time.Minute)
	rt.probeAfter = 0
	for i := range 3 {
		if resp, b := h1Get(t, rt, "POST", url+"/", "{}", nil); resp.StatusCode != 200 || b != "ok" {
			t.Fatalf("%d: %d %q", i, resp.StatusCode, b)
		}
		// The close has reached this end once the server's handler ended:
		// wait for the next accept's count instead of sleeping.
		for deadline := time.Now().Add(5 * time.Second); ; {
			pc := rt.idle[strings.TrimPrefix(url, "http://")]
			if len(pc) == 0 || !pc[0].alive() || time.Now().After(deadline) {
				break
			}
			runtime.Gosched()
		}
	}
	if n := conns.Load(); n != 3 {
		t.Fatalf("%d connections, want 3", n)
	}
}

// ended is true once the body's end was read, and then (only then) a Read
// returns io.EOF without reading the connection.
func TestH1Ended(t *testing.T) {
	for _, tc := range []struct {
		rest string
		want bool
	}{
		{"\r\n0\r\n\r\n", true}, // the end came with the data
		{"\r\n0\r\nX-T: y\r\n\r\n", true},
		{"\r\n0\r\n", false}, // the trailer's end missing
		{"\r\n", false},
		{"", false},
	} {
		raw := "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello" + tc.rest
		c1, c2 := net.Pipe()
		go func() {
			_, _ = c2.Write([]byte(raw))
			if tc.want {
				_, _ = io.Copy(io.Discard, c2) // open: the end needs no more
			} else {
				c2.Close() // what is missing never comes
			}
		}()
		pc := &h1Conn{c: c1, lr: h1Limited{c: c1}}
		pc.br = bufio.NewReaderSize(&pc.lr, 4096)
		// All of raw in the buffer (net.Pipe: one Write, read whole).
		if _, err := pc.br.Peek(len(raw)); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(pc.br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b := &h1Body{t: testH1(time.Minute), pc: pc, body: resp.Body, stop: func() bool { return true }}
		if n, err := b.Read(make([]byte, 100)); n != 5 {
			t.Fatalf("rest %q: read %d, %v", tc.rest, n, err)
		}
		if got := b.ended(); got != tc.want {
			t.Errorf("rest %q: ended %v, want %v", tc.rest, got, tc.want)
		}
		if tc.want {
			if n, err := b.Read(make([]byte, 1)); n != 0 || err != io.EOF {
				t.Errorf("rest %q: after the end: %d, %v", tc.rest, n, err)
			}
		}
		b.Close()
		c2.Close()
	}
}

// FuzzH1Request: whatever header names, values, host and path the request
// carries, what appendRequest writes is either refused or read back by
// net/http's server parser as exactly one request, with the headers given
// (the framing ones aside), its Content-Length and nothing after it.
func FuzzH1Request(f *testing.F) {
	f.Add("Mcp-Name", "add", "h:80", "/mcp", "{}")
	f.Add("Mcp-Name", "x\r\nAuthorization: Bearer y", "h", "/", "")
	f.Add("Transfer-Encoding", "chunked", "h", "/a?b", "0\r\n\r\nGET / HTTP/1.1\r\n\r\n")
	f.Add("X", "a\x00b", "h\nX: y", "/ HTTP/1.0\r\n", "{}")
	f.Fuzz(func(t *testing.T, name, value, host, path, body string) {
		u, err := url.Parse("http://upstream" + path)
		if err != nil || u.Host != "upstream" || http.CanonicalHeaderKey(name) == "Mcp-Method" {
			return // (a second spelling of a key: net/http's maps hold canonical keys)
		}
		req := &http.Request{Method: "POST", URL: u, Header: http.Header{name: {value}, "Mcp-Method": {"tools/call"}}}
		b, err := appendRequest(nil, req, host, int64(len(body)))
		if err != nil {
			return
		}
		b = append(b, body...)
		br := bufio.NewReader(bytes.NewReader(b))
		got, err := http.ReadRequest(br)
		if err != nil {
			t.Fatalf("%q: written, not read back: %v", b, err)
		}
		gotBody, err := io.ReadAll(got.Body)
		if err != nil || string(gotBody) != body || br.Buffered() != 0 {
			t.Fatalf("%q: body %q, %v, %d bytes after it", b, gotBody, err, br.Buffered())
		}
		if got.Host != host || got.Method != "POST" || got.RequestURI != u.RequestURI() {
			t.Fatalf("%q: read as %s %s host %q", b, got.Method, got.RequestURI, got.Host)
		}
		if got.Header.Get("Mcp-Method") != "tools/call" {
			t.Fatalf("%q: Mcp-Method %q", b, got.Header.Get("Mcp-Method"))
		}
		switch k := http.CanonicalHeaderKey(name); k {
		case "Host", "Content-Length", "Transfer-Encoding", "Connection", "User-Agent", "Te", "Trailer", "Upgrade":
		default:
			if v := got.Header.Values(k); len(v) != 1 || v[0] != strings.Trim(value, " \t") {
				t.Fatalf("%q: %s read as %q, want %q", b, k, v, value)
			}
		}
	})
}

// Idle connections are closed after idleTimeout, also when no request
// comes again.
func TestH1IdleConnectionsClose(t *testing.T) {
	closed := make(chan struct{})
	up := rawUpstream(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, req.Body)
		_, _ = c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
		_, _ = br.ReadByte() // returns once the gateway's end closes
		close(closed)
	})
	rt := testH1(time.Minute)
	rt.idleTimeout = 20 * time.Millisecond
	if _, b := h1Get(t, rt, "POST", up+"/", "{}", nil); b != "ok" {
		t.Fatal(b)
	}
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the idle connection was not closed")
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if len(rt.idle) != 0 || rt.sweep != nil {
		t.Fatalf("after the sweep: %d hosts kept, sweep timer %v", len(rt.idle), rt.sweep != nil)
	}
}
