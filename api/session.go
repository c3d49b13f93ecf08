package api

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Web console sessions. A browser signs in once with an API key (in the
// Authorization header of a POST: no body is read) and gets an HttpOnly,
// SameSite=Strict cookie naming a server-side session. The session keeps the
// key's hash, never the key, and every request through it looks the key up
// again, so revoking or expiring the key ends the session on the next
// request. Every request authenticated by the cookie must carry the
// session's CSRF token in CSRFHeader and come from the API's own origin.
const (
	// SessionCookie names the console session cookie.
	SessionCookie = "chalk_session"
	// CSRFHeader carries a session's CSRF token on every request the
	// cookie authenticates.
	CSRFHeader = "X-Chalk-Csrf"
	// SessionTTL is a session's absolute lifetime; SessionIdle ends one
	// unused for that long.
	SessionTTL  = 12 * time.Hour
	SessionIdle = time.Hour
	// maxSessions bounds the store; the oldest session is dropped past it.
	maxSessions = 10000
)

type session struct {
	keyHash  string // the key it was opened with: looked up on every use
	csrf     string
	created  time.Time
	lastUsed time.Time
}

// sessions is the server-side store of console sessions, by the SHA-256 of
// the cookie's value (a leaked memory dump does not yield live cookies).
// Sessions live in memory: a chalkd restart signs browsers out.
type sessions struct {
	mu  sync.Mutex
	m   map[string]*session
	now func() time.Time
}

func newSessions(now func() time.Time) *sessions {
	return &sessions{m: map[string]*session{}, now: now}
}

func randToken() string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

func sessionID(cookie string) string {
	h := sha256.Sum256([]byte(cookie))
	return hex.EncodeToString(h[:])
}

func (ss *sessions) live(s *session, now time.Time) bool {
	return now.Sub(s.created) < SessionTTL && now.Sub(s.lastUsed) < SessionIdle
}

// open stores a new session for keyHash and returns its cookie value and CSRF token.
func (ss *sessions) open(keyHash string) (cookie, csrf string) {
	cookie, csrf = randToken(), randToken()
	now := ss.now()
	ss.mu.Lock()
	defer ss.mu.Unlock()
	var oldestID string
	var oldest time.Time
	for id, s := range ss.m {
		if !ss.live(s, now) {
			delete(ss.m, id)
		} else if oldestID == "" || s.created.Before(oldest) {
			oldestID, oldest = id, s.created
		}
	}
	if len(ss.m) >= maxSessions {
		delete(ss.m, oldestID)
	}
	ss.m[sessionID(cookie)] = &session{keyHash: keyHash, csrf: csrf, created: now, lastUsed: now}
	return cookie, csrf
}

// get returns the live session named by cookie and marks it used.
func (ss *sessions) get(cookie string) (session, bool) {
	id := sessionID(cookie)
	now := ss.now()
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s, ok := ss.m[id]
	if !ok {
		return session{}, false
	}
	if !ss.live(s, now) {
		delete(ss.m, id)
		return session{}, false
	}
	s.lastUsed = now
	return *s, true
}

func (ss *sessions) close(cookie string) {
	ss.mu.Lock()
	delete(ss.m, sessionID(cookie))
	ss.mu.Unlock()
}

// SameOrigin refuses a request that a browser sent from another origin than
// the API's own (scheme, host and port of the request): its Origin header,
// when present, must be that origin, and its Sec-Fetch-Site, when present,
// "same-origin". A request with neither is accepted only as a GET or HEAD
// (browsers send Origin on every other cross-origin request).
func SameOrigin(r *http.Request) error {
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" && site != "none" {
		return fmt.Errorf("cross-site request (Sec-Fetch-Site: %s): %w", site, errdefs.ErrPermissionDenied)
	}
	origin := r.Header.Get("Origin")
	if origin == "" {
		if r.Method == http.MethodGet || r.Method == http.MethodHead {
			return nil
		}
		return fmt.Errorf("a console request without an Origin header: %w", errdefs.ErrPermissionDenied)
	}
	u, err := url.Parse(origin)
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	if err != nil || u.Scheme != scheme || !strings.EqualFold(u.Host, r.Host) {
		return fmt.Errorf("request from origin %q to %s://%s: the console's session works only from its own origin: %w", origin, scheme, r.Host, errdefs.ErrPermissionDenied)
	}
	return nil
}

// ConsoleSession is a signed-in browser: its principal and CSRF token.
type ConsoleSession struct {
	Principal *Principal
	CSRF      string
}

// SignIn opens a console session for the API key in authorization
// ("Bearer chalk_…"), after checking the request is same-origin. Only user
// API keys sign in (not workload tokens). It sets the session cookie on w.
func (s *Server) SignIn(w http.ResponseWriter, r *http.Request) (*ConsoleSession, error) {
	if err := SameOrigin(r); err != nil {
		return nil, err
	}
	tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	tok = strings.TrimSpace(tok)
	if !strings.HasPrefix(tok, KeyPrefix) {
		return nil, fmt.Errorf("not an API key: sign in with a key that starts with %s ('chalk auth keys create' makes one): %w", KeyPrefix, errdefs.ErrUnauthenticated)
	}
	hash := HashKey(tok)
	p, err := s.auth.authenticateKey(r.Context(), hash)
	if err != nil {
		return nil, err
	}
	cookie, csrf := s.sessions.open(hash)
	http.SetCookie(w, &http.Cookie{
		Name: SessionCookie, Value: cookie, Path: "/", HttpOnly: true, SameSite: http.SameSiteStrictMode,
		Secure: r.TLS != nil, MaxAge: int(SessionTTL / time.Second),
	})
	return &ConsoleSession{Principal: p, CSRF: csrf}, nil
}

// SignOut ends the request's console session (a same-origin request with
// its CSRF token) and clears the cookie.
func (s *Server) SignOut(w http.ResponseWriter, r *http.Request) error {
	if _, err := s.Session(r, true); err != nil {
		return err
	}
	c, _ := r.Cookie(SessionCookie)
	s.sessions.close(c.Value)
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: "", Path: "/", HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil, MaxAge: -1})
	return nil
}

// Session authenticates a request by its console session cookie: the
// request must be same-origin, the session live, its key still valid
// (looked up now), and, with csrf, the request must carry the session's
// token in CSRFHeader. Nothing of the body is read.
func (s *Server) Session(r *http.Request, csrf bool) (*ConsoleSession, error) {
	c, err := r.Cookie(SessionCookie)
	if err != nil || c.Value == "" {
		return nil, fmt.Errorf("not signed in to the console: %w", errdefs.ErrUnauthenticated)
	}
	if err := SameOrigin(r); err != nil {
		return nil, err
	}
	sess, ok := s.sessions.get(c.Value)
	if !ok {
		return nil, fmt.Errorf("console session expired or signed out: sign in again: %w", errdefs.ErrUnauthenticated)
	}
	if csrf && !CheckCSRF(sess.csrf, r.Header.Get(CSRFHeader)) {
		return nil, fmt.Errorf("console request without its session's %s token: %w", CSRFHeader, errdefs.ErrPermissionDenied)
	}
	p, err := s.auth.authenticateKey(r.Context(), sess.keyHash)
	if err != nil {
		s.sessions.close(c.Value) // the key was revoked or expired: so is the session
		return nil, err
	}
	return &ConsoleSession{Principal: p, CSRF: sess.csrf}, nil
}

// CheckCSRF compares a CSRF token in constant time.
func CheckCSRF(want, got string) bool {
	return got != "" && subtle.ConstantTimeCompare([]byte(want), []byte(got)) == 1
}

// authenticateRequest authenticates an API request from its headers: a
// bearer token, or (consoleOK) a console session cookie with its CSRF token
// from the API's own origin.
func (s *Server) authenticateRequest(ctx context.Context, r *http.Request, consoleOK bool) (*Principal, error) {
	if r.Header.Get("Authorization") == "" && consoleOK {
		if _, err := r.Cookie(SessionCookie); err == nil {
			cs, err := s.Session(r, true)
			if err != nil {
				return nil, err
			}
			return cs.Principal, nil
		}
	}
	return s.auth.authenticate(ctx, r.Header.Get("Authorization"))
}
