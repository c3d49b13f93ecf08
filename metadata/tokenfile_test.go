package metadata

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
)

// realClockIssuer is an issuer on the wall clock: token files refresh on
// real timers.
func realClockIssuer(t *testing.T, isActive func(context.Context, string) bool) *identity.Issuer {
	t.Helper()
	iss, err := identity.New(context.Background(), identity.Config{
		Issuer: "https://id.example.com", Dir: t.TempDir(), Alg: identity.AlgES256, IsActive: isActive,
	})
	if err != nil {
		t.Fatal(err)
	}
	return iss
}

func TestTokenFile(t *testing.T) {
	iss := realClockIssuer(t, nil)
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "sbx-a", "identity")
	path := filepath.Join(dir, AWSTokenFileName)
	stop, err := StartTokenFileConfig(ctx, TokenFileConfig{
		Issuer: iss, Subject: sandboxA.Subject(), Audience: AWSAudience, Path: path, TTL: 2 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)

	// The first token is there before Start returns.
	first, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("token file missing after Start: %v", err)
	}
	c, err := iss.Verify(ctx, string(first), AWSAudience)
	if err != nil || c.SandboxID != sandboxA.ID {
		t.Fatalf("first token: %+v, %v", c, err)
	}
	for p, want := range map[string]os.FileMode{path: 0o644, dir: 0o755} {
		if st, err := os.Stat(p); err != nil || st.Mode().Perm() != want {
			t.Fatalf("%s: mode %v (%v), want %v", p, st.Mode().Perm(), err, want)
		}
	}

	// Readers racing the refreshes always see a whole, valid token.
	var reads atomic.Int64
	var readErr atomic.Value
	readCtx, stopReading := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for readCtx.Err() == nil {
			b, err := os.ReadFile(path)
			if err == nil {
				_, err = iss.Verify(ctx, string(b), AWSAudience)
			}
			if err != nil {
				readErr.Store(err)
				return
			}
			reads.Add(1)
		}
	}()

	// Refreshed at 80% of the 2s lifetime: wait for two replacements.
	deadline := time.Now().Add(15 * time.Second)
	seen := map[string]bool{string(first): true}
	for len(seen) < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("token file replaced %d times in 15s, want 2", len(seen)-1)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		seen[string(b)] = true
		time.Sleep(20 * time.Millisecond) // polling the file with a deadline
	}
	stopReading()
	wg.Wait()
	if err, _ := readErr.Load().(error); err != nil {
		t.Fatalf("a reader saw a bad token file during refresh: %v", err)
	}
	if reads.Load() == 0 {
		t.Fatal("the reader never read the file")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("dir holds %d entries (temp files left?), want 1", len(ents))
	}
	stop()
	stop() // idempotent
}

func TestTokenFileEndedSandbox(t *testing.T) {
	var ended atomic.Bool
	iss := realClockIssuer(t, func(context.Context, string) bool { return !ended.Load() })
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), ChalkTokenFileName)
	ended.Store(true)
	if _, err := StartTokenFile(ctx, iss, sandboxA.Subject(), "api", path); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("StartTokenFile for an ended sandbox = %v, want ErrFailedPrecondition", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("a token file was written for an ended sandbox: %v", err)
	}
	ended.Store(false)
	if _, err := StartTokenFile(ctx, iss, sandboxA.Subject(), "", path); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("StartTokenFile without audience = %v", err)
	}
}

// TestTokenFileStopsWithContext: cancelling the context ends refreshing;
// stop then returns at once.
func TestTokenFileStopsWithContext(t *testing.T) {
	iss := realClockIssuer(t, nil)
	ctx, cancel := context.WithCancel(context.Background())
	stop, err := StartTokenFile(ctx, iss, sandboxA.Subject(), "api", filepath.Join(t.TempDir(), "token"))
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	done := make(chan struct{})
	go func() { stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("stop did not return after the context was cancelled")
	}
}

// logRecorder is a slog handler that keeps messages.
type logRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.msgs = append(l.msgs, r.Message)
	return nil
}
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecorder) WithGroup(string) slog.Handler      { return l }
func (l *logRecorder) has(sub string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, m := range l.msgs {
		if strings.Contains(m, sub) {
			return true
		}
	}
	return false
}

// TestTokenFileSandboxEnds: when the sandbox ends, the refresher stops on
// its own and the last token it wrote no longer verifies.
func TestTokenFileSandboxEnds(t *testing.T) {
	var ended atomic.Bool
	iss := realClockIssuer(t, func(context.Context, string) bool { return !ended.Load() })
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), ChalkTokenFileName)
	logs := &logRecorder{}
	stop, err := StartTokenFileConfig(ctx, TokenFileConfig{
		Issuer: iss, Subject: sandboxA.Subject(), Audience: "api", Path: path, TTL: time.Second, Logger: slog.New(logs),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	ended.Store(true)
	deadline := time.Now().Add(10 * time.Second)
	for !logs.has("sandbox ended") {
		if time.Now().After(deadline) {
			t.Fatal("refresher did not notice the sandbox ended within 10s")
		}
		time.Sleep(10 * time.Millisecond) // polling with a deadline
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := iss.Verify(ctx, string(b), "api"); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("token of the ended sandbox: %v", err)
	}
}

// TestTokenFileSubjectNow: each refresh mints for the subject of that moment
// (a policy update shows in the next token file: network_policy).
func TestTokenFileSubjectNow(t *testing.T) {
	iss := realClockIssuer(t, nil)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "identity", ChalkTokenFileName)
	calls := make(chan int, 8)
	var n atomic.Int64
	stop, err := StartTokenFileConfig(ctx, TokenFileConfig{
		Issuer: iss, Subject: sandboxA.Subject(), Audience: "chalk-api", Path: path, TTL: time.Second,
		SubjectNow: func(ctx context.Context) (identity.Subject, error) {
			i := int(n.Add(1))
			s := sandboxA.Subject()
			s.NetworkPolicy = "sha256:policy-" + strings.Repeat("x", i)
			calls <- i
			if i >= 3 { // hold the second refresh until the test has read the file
				<-ctx.Done()
				return s, ctx.Err()
			}
			return s, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	policyIn := func() string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		c, err := iss.Verify(ctx, string(b), "chalk-api")
		if err != nil {
			t.Fatal(err)
		}
		return c.NetworkPolicy
	}
	next := func() {
		t.Helper()
		select {
		case <-calls:
		case <-time.After(10 * time.Second): // a failure detector
			t.Fatal("SubjectNow not called")
		}
	}
	next()
	if got := policyIn(); got != "sha256:policy-x" {
		t.Fatalf("first token: network_policy %q", got)
	}
	next() // the first refresh
	next() // the second one starts (and holds): the first refresh's file is written
	if got := policyIn(); got != "sha256:policy-xx" {
		t.Fatalf("refreshed token: network_policy %q, want the subject of the refresh", got)
	}
}

// TestTokenFileFirstInPlace: with FirstInPlace, the first token goes into
// the empty file PrepareTokenFile made (the same inode, 0644, a valid token,
// no temporary file left); anything else at the path — nothing, a file
// already holding a token, a symlink — is replaced atomically as without
// it, the symlink's target untouched. Refreshes replace the file.
func TestTokenFileFirstInPlace(t *testing.T) {
	iss := realClockIssuer(t, nil)
	ctx := context.Background()
	dir := t.TempDir()
	inode := func(p string) uint64 {
		t.Helper()
		st, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		return st.Sys().(*syscall.Stat_t).Ino
	}
	start := func(path string) {
		t.Helper()
		stop, err := StartTokenFileConfig(ctx, TokenFileConfig{
			Issuer: iss, Subject: sandboxA.Subject(), Audience: AWSAudience, Path: path, TTL: time.Hour, FirstInPlace: true,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(stop)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if c, err := iss.Verify(ctx, string(b), AWSAudience); err != nil || c.SandboxID != sandboxA.ID {
			t.Fatalf("%s: token %+v, %v", path, c, err)
		}
		if st, err := os.Lstat(path); err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != 0o644 {
			t.Fatalf("%s: %v, %v: want a regular file, 0644", path, st.Mode(), err)
		}
	}

	prepared := filepath.Join(dir, "prepared")
	if err := PrepareTokenFile(prepared); err != nil {
		t.Fatal(err)
	}
	if err := PrepareTokenFile(prepared); err == nil {
		t.Fatal("PrepareTokenFile over an existing file: no error")
	}
	ino := inode(prepared)
	start(prepared)
	if inode(prepared) != ino {
		t.Fatal("the prepared file was replaced, not written into")
	}

	start(filepath.Join(dir, "missing")) // made atomically

	full := filepath.Join(dir, "full")
	if err := os.WriteFile(full, []byte("old token"), 0o644); err != nil {
		t.Fatal(err)
	}
	ino = inode(full)
	start(full)
	if inode(full) == ino {
		t.Fatal("a file holding a token was written into, not replaced")
	}

	target := filepath.Join(t.TempDir(), "target")
	if err := os.WriteFile(target, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	start(link) // the link is replaced by a file
	if b, err := os.ReadFile(target); err != nil || len(b) != 0 {
		t.Fatalf("the symlink's target: %q, %v: want it untouched", b, err)
	}

	ents, _ := os.ReadDir(dir)
	if len(ents) != 4 {
		t.Fatalf("dir holds %d entries (temp files left?), want 4", len(ents))
	}
}
