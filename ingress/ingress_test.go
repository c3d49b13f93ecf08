package ingress

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var testKey = bytes.Repeat([]byte{7}, 32)

func TestToken(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	tok := Sign(testKey, "sb-00aa", 8080, now.Add(time.Minute))
	for _, c := range []struct {
		name string
		tok  string
		id   string
		port uint16
		at   time.Time
		want bool
	}{
		{"valid", tok, "sb-00aa", 8080, now, true},
		{"expired", tok, "sb-00aa", 8080, now.Add(time.Minute), false},
		{"other port", tok, "sb-00aa", 8081, now, false},
		{"other sandbox", tok, "sb-00ab", 8080, now, false},
		{"later expiry forged", strings.Replace(tok, "1800000060", "1900000060", 1), "sb-00aa", 8080, now, false},
		{"other key", Sign(bytes.Repeat([]byte{8}, 32), "sb-00aa", 8080, now.Add(time.Minute)), "sb-00aa", 8080, now, false},
		{"empty", "", "sb-00aa", 8080, now, false},
		{"garbage", "x.y", "sb-00aa", 8080, now, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := Verify(testKey, c.tok, c.id, c.port, c.at); got != c.want {
				t.Fatalf("Verify = %v, want %v", got, c.want)
			}
		})
	}
}

// newTest serves an ingress (domain "sbx.test") in front of a backend on
// loopback, exposed as sb-0001:<its port> of org "a".
func newTest(t *testing.T, public bool, backend http.Handler) (*Server, *httptest.Server, uint16) {
	t.Helper()
	be := httptest.NewServer(backend)
	t.Cleanup(be.Close)
	ap := netip.MustParseAddrPort(be.Listener.Addr().String())
	s, err := New(Config{BaseURL: "http://ingress.test", Domain: "sbx.test", Key: testKey,
		Limits: Limits{MaxPerRoute: 2},
		Authenticate: func(_ context.Context, h string) (string, error) {
			switch h {
			case "Bearer chalk_a":
				return "a", nil
			case "Bearer chalk_b":
				return "b", nil
			}
			return "", errors.New("bad key")
		}})
	if err != nil {
		t.Fatal(err)
	}
	s.Add(Route{SandboxID: "sb-0001", Port: ap.Port(), OrgID: "a", Public: public, Addr: ap.Addr()})
	front := httptest.NewServer(s)
	t.Cleanup(front.Close)
	t.Cleanup(s.Close)
	return s, front, ap.Port()
}

func do(t *testing.T, front *httptest.Server, host, path string, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", front.URL+path, nil)
	req.Host = host
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

func TestRoutingAndAccess(t *testing.T) {
	var seen *http.Request
	_, front, port := newTest(t, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen = r.Clone(context.Background())
		io.WriteString(w, r.URL.RequestURI())
	}))
	p := itoa(port)
	host := p + "-sb-0001.sbx.test"
	tok := Sign(testKey, "sb-0001", port, time.Now().Add(time.Hour))
	for _, c := range []struct {
		name, host, path string
		hdr              []string
		code             int
		body             string
	}{
		{"no credentials", host, "/x", nil, 401, ""},
		{"org key", host, "/x?a=1", []string{"Authorization", "Bearer chalk_a"}, 200, "/x?a=1"},
		{"other org key", host, "/x", []string{"Authorization", "Bearer chalk_b"}, 403, ""},
		{"bad key", host, "/x", []string{"Authorization", "Bearer chalk_zz"}, 401, ""},
		{"token in query", host, "/x?chalk_token=" + tok + "&b=2", nil, 200, "/x?b=2"},
		{"token as bearer", host, "/y", []string{"Authorization", "Bearer " + tok}, 200, "/y"},
		{"token cookie", host, "/z", []string{"Cookie", "chalk_ingress=" + tok}, 200, "/z"},
		{"path route", "ingress.test", "/s/sb-0001/" + p + "/deep/er?q", []string{"Authorization", "Bearer chalk_a"}, 200, "/deep/er?q"},
		{"path route without slash", "ingress.test", "/s/sb-0001/" + p, nil, 308, ""},
		{"unknown sandbox", "ingress.test", "/s/sb-0002/" + p + "/", nil, 404, ""},
		{"unknown port", "1-sb-0001.sbx.test", "/", nil, 404, ""},
		{"bad id", "ingress.test", "/s/../" + p + "/", nil, 404, ""},
		{"port 0", "0-sb-0001.sbx.test", "/", nil, 404, ""},
		{"nested host", "a." + host, "/", nil, 404, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			seen = nil
			resp, body := do(t, front, c.host, c.path, c.hdr...)
			if resp.StatusCode != c.code || (c.code == 200 && body != c.body) {
				t.Fatalf("%d %q, want %d %q", resp.StatusCode, body, c.code, c.body)
			}
			if c.code != 200 {
				if seen != nil {
					t.Fatal("a refused request reached the sandbox")
				}
				return
			}
			if seen.Header.Get("Authorization") != "" || strings.Contains(seen.Header.Get("Cookie"), "chalk_ingress") || strings.Contains(seen.URL.RawQuery, "chalk_token") {
				t.Fatalf("credentials reached the sandbox: %v %q", seen.Header, seen.URL.RawQuery)
			}
		})
	}
}

// TestRemoveCutsStreams: a streaming response in flight ends when its
// route is removed, and the route answers 404 afterwards.
func TestRemoveCutsStreams(t *testing.T) {
	started := make(chan struct{})
	s, front, port := newTest(t, true, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		close(started)
		<-r.Context().Done()
	}))
	host := itoa(port) + "-sb-0001.sbx.test"
	req, _ := http.NewRequest("GET", front.URL+"/", nil)
	req.Host = host
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line := make([]byte, 6)
	if _, err := io.ReadFull(resp.Body, line); err != nil || string(line) != "first\n" {
		t.Fatalf("streamed first line: %q %v (buffered?)", line, err)
	}
	<-started
	s.Remove("sb-0001", port)
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Fatal("stream ended cleanly after its route was removed; want it cut")
	}
	if r, _ := do(t, front, host, "/"); r.StatusCode != 404 {
		t.Fatalf("removed route: %d", r.StatusCode)
	}
}

// TestPerRouteLimit: requests past MaxPerRoute are refused at once.
func TestPerRouteLimit(t *testing.T) {
	hold := make(chan struct{})
	in := make(chan struct{}, 2)
	_, front, port := newTest(t, true, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		in <- struct{}{}
		<-hold
	}))
	defer close(hold)
	host := itoa(port) + "-sb-0001.sbx.test"
	for range 2 {
		go func() {
			req, _ := http.NewRequest("GET", front.URL+"/", nil)
			req.Host = host
			if resp, err := http.DefaultTransport.RoundTrip(req); err == nil {
				resp.Body.Close()
			}
		}()
	}
	<-in
	<-in
	if r, _ := do(t, front, host, "/"); r.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("third request: %d, want 503", r.StatusCode)
	}
}

func TestListenerPerClient(t *testing.T) {
	s, err := New(Config{BaseURL: "http://x", Key: testKey, Limits: Limits{MaxConnsPerClient: 2},
		Authenticate: func(context.Context, string) (string, error) { return "", errors.New("no") }})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := s.Listener(raw)
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	var cs []net.Conn
	for range 3 {
		c, err := net.Dial("tcp", raw.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cs = append(cs, c)
	}
	_ = cs[2].SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := cs[2].Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("third connection from one client: %v, want closed (EOF)", err)
	}
	_ = cs[0].SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := cs[0].Read(make([]byte, 1)); errors.Is(err, io.EOF) {
		t.Fatal("first connection closed")
	}
}

func FuzzParse(f *testing.F) {
	s, _ := New(Config{BaseURL: "http://x", Domain: "sbx.test", Key: testKey,
		Authenticate: func(context.Context, string) (string, error) { return "", errors.New("no") }})
	for _, seed := range []string{"8080-sb-00ff.sbx.test|/", "x|/s/sb-00ff/80/a", "x|/s/sb-00ff/080/", "65536-sb-0.sbx.test|/"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		host, path, _ := strings.Cut(in, "|")
		r := httptest.NewRequest("GET", "http://x/", nil)
		r.Host, r.URL.Path = host, path
		k, tg, prefix, ok := s.parse(r)
		if !ok {
			return
		}
		if k.port == 0 || !validID(k.id) || !strings.HasPrefix(prefix, "/") {
			t.Fatalf("parse(%q, %q) = %+v %q", host, path, k, prefix)
		}
		if tg.path != "" && !strings.HasPrefix(tg.path, "/") {
			t.Fatalf("forwarded path %q", tg.path)
		}
	})
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }

// TestEndedSandboxNotForwarded: a route left for a sandbox that no longer
// runs (its address may be another sandbox's now) is not forwarded to.
func TestEndedSandboxNotForwarded(t *testing.T) {
	var reached, ended atomic.Bool
	s, front, port := newTest(t, true, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { reached.Store(true) }))
	s.cfg.Live = func(id string) bool { return !ended.Load() && id == "sb-0001" }
	host := itoa(port) + "-sb-0001.sbx.test"
	if r, _ := do(t, front, host, "/"); r.StatusCode != 200 || !reached.Load() {
		t.Fatalf("live: %d reached=%v", r.StatusCode, reached.Load())
	}
	ended.Store(true)
	reached.Store(false)
	if r, _ := do(t, front, host, "/"); r.StatusCode != 404 || reached.Load() {
		t.Fatalf("ended: %d reached=%v", r.StatusCode, reached.Load())
	}
}

// TestClientBounds: a client that never finishes its headers is
// disconnected at ReadHeaderTimeout; oversized headers are refused (431).
func TestClientBounds(t *testing.T) {
	s, err := New(Config{BaseURL: "http://x", Key: testKey, Limits: Limits{ReadHeaderTimeout: 200 * time.Millisecond, MaxHeaderBytes: 4 << 10},
		Authenticate: func(context.Context, string) (string, error) { return "", errors.New("no") }})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := s.HTTPServer()
	go hs.Serve(s.Listener(l))
	defer hs.Close()

	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n") // and nothing more
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	b, _ := io.ReadAll(c)
	if time.Since(start) > 5*time.Second {
		t.Fatalf("slow headers held the connection %s", time.Since(start))
	}
	if len(b) > 0 && !strings.Contains(string(b), "408") {
		t.Fatalf("slow headers answered %q", b)
	}

	req, _ := http.NewRequest("GET", "http://"+l.Addr().String()+"/", nil)
	req.Header.Set("X-Big", strings.Repeat("a", 16<<10))
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("16 KiB header: %d, want 431", resp.StatusCode)
	}
}

// TestDialVia: with DialVia (a fleet's control plane), a route is reached
// by its sandbox id and port through the dial function, never by its
// address; two sandboxes with the same address (on different nodes) never
// share a kept-alive connection, in either order; a dial's failure is a
// 502.
func TestDialVia(t *testing.T) {
	backends := map[string]*httptest.Server{}
	for _, id := range []string{"sb-000a", "sb-000b"} {
		be := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, id) }))
		t.Cleanup(be.Close)
		backends[id] = be
	}
	s, err := New(Config{BaseURL: "http://ingress.test", Domain: "sbx.test", Key: testKey,
		Authenticate: func(context.Context, string) (string, error) { return "", errors.New("no keys") }})
	if err != nil {
		t.Fatal(err)
	}
	var dials atomic.Int32
	s.DialVia(func(ctx context.Context, id string, port uint16) (net.Conn, error) {
		dials.Add(1)
		be, ok := backends[id]
		if !ok || port != 8080 {
			return nil, errors.New("no such sandbox port")
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", be.Listener.Addr().String())
	})
	same := netip.MustParseAddr("10.221.0.5") // both nodes gave their sandbox this address
	for _, id := range []string{"sb-000a", "sb-000b", "sb-000c"} {
		s.Add(Route{SandboxID: id, Port: 8080, OrgID: "a", Public: true, Addr: same})
	}
	front := httptest.NewServer(s)
	t.Cleanup(front.Close)
	t.Cleanup(s.Close)
	for range 3 {
		for _, id := range []string{"sb-000a", "sb-000b"} {
			res, body := do(t, front, "8080-"+id+".sbx.test", "/")
			if res.StatusCode != 200 || body != id {
				t.Fatalf("%s: %d %q", id, res.StatusCode, body)
			}
		}
	}
	if n := dials.Load(); n != 2 {
		t.Errorf("%d dials, want 2 (one kept-alive connection per sandbox)", n)
	}
	if res, _ := do(t, front, "8080-sb-000c.sbx.test", "/"); res.StatusCode != http.StatusBadGateway {
		t.Errorf("a failed dial: %d, want 502", res.StatusCode)
	}
}

// TestSmuggling: a client's connection to a public route cannot carry a
// request past the ingress's checks. Each request the ingress reads is
// routed and authorised on its own and re-encoded toward the sandbox
// (ReverseProxy), so a body framed two ways (Content-Length and chunked),
// two Content-Lengths, an obfuscated Transfer-Encoding, or a second request
// pipelined behind the first to another sandbox's private route reaches
// the public backend as one well-framed request at most, and the private
// route never.
func TestSmuggling(t *testing.T) {
	var public, private atomic.Int32
	var mu sync.Mutex
	var bodies []string
	s, front, port := newTest(t, true, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		public.Add(1)
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies = append(bodies, r.Method+" "+r.URL.Path+" "+string(b))
		mu.Unlock()
		io.WriteString(w, "public")
	}))
	be := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		private.Add(1)
		io.WriteString(w, "private")
	}))
	defer be.Close()
	ap := netip.MustParseAddrPort(be.Listener.Addr().String())
	s.Add(Route{SandboxID: "sb-0002", Port: ap.Port(), OrgID: "a", Addr: ap.Addr()})
	pubHost := itoa(port) + "-sb-0001.sbx.test"
	privHost := itoa(ap.Port()) + "-sb-0002.sbx.test"
	smuggled := "GET /secret HTTP/1.1\r\nHost: " + privHost + "\r\n\r\n"
	for _, c := range []struct{ name, head, body string }{
		{"CL.TE", "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n" + smuggled},
		{"TE.CL", "Transfer-Encoding: chunked\r\nContent-Length: 60\r\n", "0\r\n\r\n" + smuggled},
		{"two lengths", "Content-Length: 0\r\nContent-Length: 60\r\n", smuggled},
		{"obfuscated TE", "Transfer-Encoding: xchunked\r\n", "0\r\n\r\n" + smuggled},
		{"TE list", "Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n" + smuggled},
		{"pipelined", "Content-Length: 0\r\n", smuggled},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", strings.TrimPrefix(front.URL, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			// A last request closes the connection once everything before it was answered.
			last := "GET /end HTTP/1.1\r\nHost: " + pubHost + "\r\nConnection: close\r\n\r\n"
			io.WriteString(conn, "POST /p HTTP/1.1\r\nHost: "+pubHost+"\r\n"+c.head+"\r\n"+c.body+last)
			_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second)) // a hang fails, not blocks
			out, _ := io.ReadAll(conn)
			if private.Load() != 0 {
				t.Fatalf("the private route was reached: %q", out)
			}
			mu.Lock()
			defer mu.Unlock()
			for _, b := range bodies {
				if strings.Contains(b, "/secret") {
					t.Fatalf("the smuggled request reached the public sandbox as a body: %q", b)
				}
			}
			if !strings.HasPrefix(string(out), "HTTP/1.1 400") && !strings.HasPrefix(string(out), "HTTP/1.1 501") && !strings.Contains(string(out), "HTTP/1.1 401") {
				t.Fatalf("neither refused whole nor the second request refused on its own: %q", out)
			}
		})
	}
}
