package api

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
)

const consoleOrigin = "http://example.com" // httptest.NewRequest's host

// consoleSignIn signs in with secret from the console's origin and returns
// the session cookie and CSRF token.
func consoleSignIn(t *testing.T, s *Server, secret string) (*http.Cookie, string) {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/console/session", nil)
	req.Header.Set("Origin", consoleOrigin)
	req.Header.Set("Authorization", "Bearer "+secret)
	w := httptest.NewRecorder()
	cs, err := s.SignIn(w, req)
	if err != nil {
		t.Fatalf("sign in: %v", err)
	}
	cookies := w.Result().Cookies()
	if len(cookies) != 1 || cookies[0].Name != SessionCookie {
		t.Fatalf("sign in set cookies %v", cookies)
	}
	c := cookies[0]
	if !c.HttpOnly || c.SameSite != http.SameSiteStrictMode || c.Path != "/" || c.Secure {
		t.Fatalf("session cookie %+v: want HttpOnly, SameSite=Strict, Path=/, not Secure without TLS", c)
	}
	return c, cs.CSRF
}

// consoleCall is a WhoAmI from a browser: the cookie, and the given Origin,
// CSRF token and Sec-Fetch-Site ("" leaves a header out). Its body stalls
// after its first bytes: a request answered before its body is read gets
// its answer; one whose body is read waits until the test's deadline.
func consoleCall(t *testing.T, h http.Handler, c *http.Cookie, origin, csrf, site string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req := httptest.NewRequest(http.MethodPost, "/chalk.compute.v1.IdentityService/WhoAmI",
		&stallingBody{ctx: ctx, first: 1, release: make(chan struct{})}).WithContext(ctx)
	if csrf == "body" { // a complete body, for the calls that must succeed
		req = httptest.NewRequest(http.MethodPost, "/chalk.compute.v1.IdentityService/WhoAmI", strings.NewReader("{}"))
		csrf = ""
	}
	req.Header.Set("Content-Type", "application/json")
	req.AddCookie(c)
	for k, v := range map[string]string{"Origin": origin, CSRFHeader: csrf, "Sec-Fetch-Site": site} {
		if v != "" {
			req.Header.Set(k, v)
		}
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w.Code
}

// TestConsoleSession: a console session authenticates API calls like its
// key, only with its CSRF token, from the API's own origin, and only until
// the key is revoked; refused requests are answered from their headers.
func TestConsoleSession(t *testing.T) {
	ta := newTestAPI(t, Config{})
	h := ta.s.Handler()
	cookie, csrf := consoleSignIn(t, ta.s, ta.other)

	ok := func(name string) {
		t.Helper()
		req := httptest.NewRequest(http.MethodPost, "/chalk.compute.v1.IdentityService/WhoAmI", strings.NewReader("{}"))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Origin", consoleOrigin)
		req.Header.Set(CSRFHeader, csrf)
		req.AddCookie(cookie)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `"user":"user1"`) {
			t.Fatalf("%s: %d %s", name, w.Code, w.Body)
		}
	}
	ok("same-origin call with the CSRF token")

	for _, tc := range []struct {
		name, origin, csrf, site string
		want                     int
	}{
		{"cross-site POST without the CSRF token", "http://evil.example", "", "cross-site", http.StatusForbidden},
		{"cross-site POST with a stolen CSRF token", "http://evil.example", csrf, "", http.StatusForbidden},
		{"same-origin POST without the CSRF token", consoleOrigin, "", "same-origin", http.StatusForbidden},
		{"wrong CSRF token", consoleOrigin, wrongToken(csrf), "same-origin", http.StatusForbidden},
		{"wrong scheme in Origin", "https://example.com", csrf, "", http.StatusForbidden},
		{"same-site but not same-origin", consoleOrigin, csrf, "same-site", http.StatusForbidden},
		{"POST without Origin", "", csrf, "", http.StatusForbidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if code := consoleCall(t, h, cookie, tc.origin, tc.csrf, tc.site); code != tc.want {
				t.Fatalf("got %d, want %d", code, tc.want)
			}
		})
	}

	t.Run("not through a sandbox's metadata /api", func(t *testing.T) {
		sh := ta.s.SandboxHandler(func(*http.Request) (string, bool) { return "sb-1", true })
		if code := consoleCall(t, sh, cookie, consoleOrigin, csrf, "same-origin"); code != http.StatusUnauthorized {
			t.Fatalf("got %d, want 401", code)
		}
	})

	t.Run("wrong key at sign-in: no session", func(t *testing.T) {
		for _, key := range []string{"chalk_" + strings.Repeat("A", 46), "not-a-key", ""} {
			req := httptest.NewRequest(http.MethodPost, "/console/session", nil)
			req.Header.Set("Origin", consoleOrigin)
			req.Header.Set("Authorization", "Bearer "+key)
			w := httptest.NewRecorder()
			if _, err := ta.s.SignIn(w, req); err == nil || len(w.Result().Cookies()) != 0 {
				t.Fatalf("key %q: err %v, cookies %v", key, err, w.Result().Cookies())
			}
		}
	})

	t.Run("sign-in from another origin", func(t *testing.T) {
		req := httptest.NewRequest(http.MethodPost, "/console/session", nil)
		req.Header.Set("Origin", "http://evil.example")
		req.Header.Set("Authorization", "Bearer "+ta.other)
		w := httptest.NewRecorder()
		if _, err := ta.s.SignIn(w, req); err == nil || len(w.Result().Cookies()) != 0 {
			t.Fatalf("err %v, cookies %v", err, w.Result().Cookies())
		}
	})

	t.Run("signed out", func(t *testing.T) {
		c2, csrf2 := consoleSignIn(t, ta.s, ta.admin)
		req := httptest.NewRequest(http.MethodDelete, "/console/session", nil)
		req.Header.Set("Origin", consoleOrigin)
		req.AddCookie(c2)
		if err := ta.s.SignOut(httptest.NewRecorder(), req); err == nil {
			t.Fatal("sign-out without the CSRF token succeeded")
		}
		req.Header.Set(CSRFHeader, csrf2)
		if err := ta.s.SignOut(httptest.NewRecorder(), req); err != nil {
			t.Fatal(err)
		}
		if code := consoleCall(t, h, c2, consoleOrigin, csrf2, "same-origin"); code != http.StatusUnauthorized {
			t.Fatalf("after sign-out: %d, want 401", code)
		}
	})

	t.Run("metrics need an admin's session and its CSRF token", func(t *testing.T) {
		ra := ta.s.RequireAdmin(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
		ac, acsrf := consoleSignIn(t, ta.s, ta.admin)
		for _, tc := range []struct {
			name   string
			c      *http.Cookie
			csrf   string
			origin string
			want   int
		}{
			{"admin", ac, acsrf, "", http.StatusOK},
			{"admin without the CSRF token", ac, "", "", http.StatusForbidden},
			{"admin from another origin", ac, acsrf, "http://evil.example", http.StatusForbidden},
			{"member", cookie, csrf, "", http.StatusForbidden},
		} {
			req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
			req.AddCookie(tc.c)
			if tc.csrf != "" {
				req.Header.Set(CSRFHeader, tc.csrf)
			}
			if tc.origin != "" {
				req.Header.Set("Origin", tc.origin)
			}
			w := httptest.NewRecorder()
			ra.ServeHTTP(w, req)
			if w.Code != tc.want {
				t.Errorf("%s: %d, want %d", tc.name, w.Code, tc.want)
			}
		}
	})

	ok("the session still works")
	if err := ta.st.RevokeKey(context.Background(), "o1", "key-user1", time.Now()); err != nil {
		t.Fatal(err)
	}
	if code := consoleCall(t, h, cookie, consoleOrigin, csrf, "same-origin"); code != http.StatusUnauthorized {
		t.Fatalf("revoked key's session: %d, want 401", code)
	}
	if _, err := ta.s.Session(httptest.NewRequest(http.MethodGet, "/console/session", nil), false); err == nil {
		t.Fatal("a request without a cookie has a session")
	}
}

// TestSessionExpiry: sessions end after SessionIdle unused and after
// SessionTTL in any case.
func TestSessionExpiry(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ss := newSessions(func() time.Time { return now })
	idle, _ := ss.open("h1")
	busy, _ := ss.open("h2")
	for range 2 * int(SessionTTL/SessionIdle) {
		now = now.Add(SessionIdle / 2)
		if _, ok := ss.get(busy); !ok && now.Sub(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)) < SessionTTL {
			t.Fatalf("a session in use ended at %s", now)
		}
	}
	if _, ok := ss.get(idle); ok {
		t.Fatal("an idle session is still live")
	}
	if _, ok := ss.get(busy); ok {
		t.Fatal("a session is live past SessionTTL")
	}
	if len(ss.m) != 0 {
		t.Fatalf("%d ended sessions kept", len(ss.m))
	}
}

// TestLocalTransport: in-process calls act as the principal in their
// context, through the same interceptors (authz) as any call; a call
// without one is refused.
func TestLocalTransport(t *testing.T) {
	ta := newTestAPI(t, Config{})
	hc := &http.Client{Transport: ta.s.LocalTransport()}
	c := computev1connect.NewIdentityServiceClient(hc, "http://chalkd.local")
	if _, err := c.WhoAmI(context.Background(), connect.NewRequest(&v1.WhoAmIRequest{})); err == nil {
		t.Fatal("a call without a principal succeeded")
	}
	p, err := ta.s.auth.authenticate(context.Background(), "Bearer "+ta.other)
	if err != nil {
		t.Fatal(err)
	}
	ctx := WithPrincipal(context.Background(), p)
	r, err := c.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{}))
	if err != nil || r.Msg.User != "user1" || r.Msg.Role != "member" {
		t.Fatalf("WhoAmI: %v %v", r, err)
	}
	// authz still applies: a member may not rotate the signing keys.
	if _, err := c.RotateKeys(ctx, connect.NewRequest(&v1.RotateKeysRequest{})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("RotateKeys as a member: %v, want permission_denied", err)
	}
}

// wrongToken is tok with its first character changed (always a different
// token: a fixed replacement would equal tok whenever tok starts with it).
func wrongToken(tok string) string {
	if tok[0] == 'x' {
		return "y" + tok[1:]
	}
	return "x" + tok[1:]
}
