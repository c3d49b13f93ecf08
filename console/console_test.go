package console

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/store"
)

// newConsole serves the console and the API (as chalkd does) with one org
// whose admin's key it returns.
func newConsole(t *testing.T) (*httptest.Server, string) {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "chalk.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	secret, prefix, hash := api.NewKey()
	now := time.Now()
	k := &store.APIKey{ID: "key-ann", Hash: hash, Prefix: prefix, OrgID: "o1", User: "ann", Name: "ann", Role: store.RoleAdmin, CreatedBy: "ann", CreatedAt: now}
	if err := st.CreateOrg(ctx, store.Org{Name: "o1", CreatedAt: now}, "ann", false, k); err != nil {
		t.Fatal(err)
	}
	srv := api.New(ctx, api.Config{Store: st})
	mux := http.NewServeMux()
	mux.Handle("/console/", New(Config{API: srv}))
	mux.Handle("/", srv.Handler())
	hs := httptest.NewServer(mux)
	t.Cleanup(hs.Close)
	return hs, secret
}

func signIn(t *testing.T, hs *httptest.Server, origin, key string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, hs.URL+"/console/session", nil)
	req.Header.Set("Origin", origin)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := hs.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// TestSecurityHeaders: every console response carries the strict CSP
// (no inline scripts, no framing) and nosniff.
func TestSecurityHeaders(t *testing.T) {
	hs, _ := newConsole(t)
	for _, path := range []string{"/console/", "/console/static/app.js", "/console/static/vendor/xterm/xterm/xterm.js", "/console/session", "/console/nope"} {
		resp, err := hs.Client().Get(hs.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		csp := resp.Header.Get("Content-Security-Policy")
		for _, want := range []string{"default-src 'self'", "script-src 'self';", "frame-ancestors 'none'", "object-src 'none'"} {
			if !strings.Contains(csp, want) {
				t.Errorf("%s: CSP %q lacks %q", path, csp, want)
			}
		}
		directives := map[string]string{}
		for _, d := range strings.Split(csp, ";") {
			name, val, _ := strings.Cut(strings.TrimSpace(d), " ")
			directives[name] = val
		}
		if directives["script-src"] != "'self'" || directives["default-src"] != "'self'" {
			t.Errorf("%s: CSP %q allows scripts from elsewhere than chalkd's own files", path, csp)
		}
		if resp.Header.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("%s: no nosniff", path)
		}
	}
	// The page has no inline script or handler the CSP would block.
	resp, err := hs.Client().Get(hs.URL + "/console/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	page := string(body)
	if resp.StatusCode != 200 || !strings.Contains(page, `<script src="/console/static/app.js"`) {
		t.Fatalf("index: %d %q", resp.StatusCode, page)
	}
	if strings.Contains(page, "<script>") || strings.Contains(page, " onclick=") || strings.Contains(page, "javascript:") {
		t.Fatal("index.html has inline script")
	}
}

// TestSignIn: a good key gets a session cookie and a CSRF token; a wrong
// key gets a clear error and no cookie; sign-in from another origin is
// refused.
func TestSignIn(t *testing.T) {
	hs, key := newConsole(t)
	resp := signIn(t, hs, hs.URL, "chalk_wrongwrongwrong")
	var e struct{ Error string }
	_ = json.NewDecoder(resp.Body).Decode(&e)
	if resp.StatusCode != http.StatusUnauthorized || e.Error != "invalid API token" || len(resp.Cookies()) != 0 {
		t.Fatalf("wrong key: %d %q cookies %v", resp.StatusCode, e.Error, resp.Cookies())
	}
	resp = signIn(t, hs, "http://evil.example", key)
	if resp.StatusCode != http.StatusForbidden || len(resp.Cookies()) != 0 {
		t.Fatalf("cross-origin sign-in: %d cookies %v", resp.StatusCode, resp.Cookies())
	}
	resp = signIn(t, hs, hs.URL, key)
	var info sessionInfo
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil || resp.StatusCode != 200 || info.CSRF == "" || info.User != "ann" {
		t.Fatalf("sign in: %d %+v %v", resp.StatusCode, info, err)
	}
	if cs := resp.Cookies(); len(cs) != 1 || !cs[0].HttpOnly || cs[0].SameSite != http.SameSiteStrictMode {
		t.Fatalf("cookie %v", cs)
	}
	if resp.Header.Get("Cache-Control") != "no-store" {
		t.Fatal("sign-in answer may be cached")
	}
}

// TestTerminalAuth: the terminal's WebSocket opens only for a signed-in
// browser from the console's origin, and runs nothing before its first
// message carries the session's CSRF token.
func TestTerminalAuth(t *testing.T) {
	hs, key := newConsole(t)
	resp := signIn(t, hs, hs.URL, key)
	cookie := resp.Cookies()[0]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	wsURL := "ws" + strings.TrimPrefix(hs.URL, "http") + "/console/terminal?sandbox=sb-1"
	dial := func(origin string, withCookie bool) (*websocket.Conn, *http.Response, error) {
		h := http.Header{}
		if origin != "" {
			h.Set("Origin", origin)
		}
		if withCookie {
			h.Set("Cookie", cookie.Name+"="+cookie.Value)
		}
		return websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPHeader: h})
	}
	for _, tc := range []struct {
		name       string
		origin     string
		withCookie bool
		want       int
	}{
		{"no session", hs.URL, false, http.StatusUnauthorized},
		{"another origin", "http://evil.example", true, http.StatusForbidden},
		{"no Origin", "", true, http.StatusForbidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, resp, err := dial(tc.origin, tc.withCookie)
			if err == nil {
				c.CloseNow()
				t.Fatal("connected")
			}
			if resp == nil || resp.StatusCode != tc.want {
				t.Fatalf("got %v, want %d", resp, tc.want)
			}
		})
	}
	t.Run("wrong CSRF token", func(t *testing.T) {
		c, _, err := dial(hs.URL, true)
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseNow()
		if err := c.Write(ctx, websocket.MessageText, []byte(`{"csrf":"nope","rows":24,"cols":80}`)); err != nil {
			t.Fatal(err)
		}
		_, _, err = c.Read(ctx)
		if websocket.CloseStatus(err) != websocket.StatusPolicyViolation {
			t.Fatalf("read after a wrong token: %v, want close 1008", err)
		}
	})
}
