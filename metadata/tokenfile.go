package metadata

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/atomicfile"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
)

// TokenMinter mints the tokens of a token file: the identity issuer
// (*identity.Issuer), or on a fleet node its link to the control plane's.
type TokenMinter interface {
	Mint(ctx context.Context, s identity.Subject, audience string, ttl time.Duration) (string, time.Time, error)
	Now() time.Time
}

// TokenFileConfig configures a token file; see StartTokenFileConfig.
type TokenFileConfig struct {
	Issuer   TokenMinter
	Subject  identity.Subject
	Audience string
	// Path is the host path of the file, inside a directory that is
	// bind-mounted (as a directory, so renames show through) into the
	// sandbox.
	Path string
	// TTL is the lifetime of each token (default identity.DefaultTTL).
	TTL time.Duration
	// Logger receives refresh failures (nil discards).
	Logger *slog.Logger
	// SubjectNow, if set, gives the subject at each refresh instead of
	// Subject (claims that change while the sandbox runs, such as
	// network_policy). Its errors are retried as refresh failures.
	SubjectNow func(ctx context.Context) (identity.Subject, error)
	// FirstInPlace says that nothing reads the file yet (a pre-started
	// sandbox being claimed: nothing of its user's runs before its token
	// files are written) and that an empty regular file at Path was made
	// for it beforehand (PrepareTokenFile, at pre-start). The first token
	// is then written into that file, without a temporary file to create
	// and rename on a claim's path. Without such a file (a cold start, a
	// file already holding a token, a symlink) the first token replaces
	// the file atomically as always; so do all later refreshes.
	FirstInPlace bool
}

// PrepareTokenFile makes the empty file at path (0644; not following a
// symlink, failing if anything is there) that a later StartTokenFileConfig
// with FirstInPlace writes its first token into.
func PrepareTokenFile(path string) error {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return fmt.Errorf("metadata: token file %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.Fchmod(fd, 0o644); err != nil { // the umask applied to the open
		return fmt.Errorf("metadata: token file %s: %w", path, err)
	}
	return nil
}

// StartTokenFile keeps a token for (s, audience) fresh at path (host path of
// a dir bind-mounted into the sandbox), refreshing at 80% of its lifetime,
// replaced atomically (write temp + rename), 0644 inside a 0755 dir. The
// first token is written before StartTokenFile returns, so the file exists
// when the sandbox starts. Refreshing stops when ctx is done, when stop is
// called (stop waits for it), or when the issuer refuses the sandbox
// because it has ended.
func StartTokenFile(ctx context.Context, iss *identity.Issuer, s identity.Subject, audience, path string) (stop func(), err error) {
	return StartTokenFileConfig(ctx, TokenFileConfig{Issuer: iss, Subject: s, Audience: audience, Path: path})
}

// refreshFraction is the part of a token's lifetime after which it is
// replaced.
const refreshFraction = 0.8

// StartTokenFileConfig is StartTokenFile with every option.
func StartTokenFileConfig(ctx context.Context, cfg TokenFileConfig) (stop func(), err error) {
	if cfg.Issuer == nil || cfg.Path == "" {
		return nil, fmt.Errorf("metadata: token file needs an issuer and a path: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	dir := filepath.Dir(cfg.Path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("metadata: token dir: %w", err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, fmt.Errorf("metadata: token dir: %w", err)
	}
	next, err := refreshTokenFile(ctx, cfg, cfg.FirstInPlace)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		backoff := time.Second
		t := time.NewTimer(next)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			wait, err := refreshTokenFile(ctx, cfg, false)
			switch {
			case err == nil:
				backoff = time.Second
			case errors.Is(err, errdefs.ErrFailedPrecondition):
				cfg.Logger.InfoContext(ctx, "metadata: sandbox ended; token file no longer refreshed", "path", cfg.Path, "sandbox", cfg.Subject.SandboxID)
				return
			case ctx.Err() != nil:
				return
			default:
				// Retry well before the current token expires.
				cfg.Logger.WarnContext(ctx, "metadata: token file refresh failed", "path", cfg.Path, "err", err, "retry_in", backoff)
				wait = backoff
				backoff = min(2*backoff, 30*time.Second)
			}
			t.Reset(wait)
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			cancel()
			<-done
		})
	}, nil
}

// refreshTokenFile mints a token, replaces the file (or, inPlace, writes it
// into the empty file prepared for it, if there is one) and returns how
// long to wait before the next refresh.
func refreshTokenFile(ctx context.Context, cfg TokenFileConfig, inPlace bool) (time.Duration, error) {
	sub := cfg.Subject
	if cfg.SubjectNow != nil {
		var err error
		if sub, err = cfg.SubjectNow(ctx); err != nil {
			return 0, err
		}
	}
	minted := cfg.Issuer.Now()
	tok, exp, err := cfg.Issuer.Mint(ctx, sub, cfg.Audience, cfg.TTL)
	if err != nil {
		return 0, err
	}
	if !inPlace || !writePrepared(cfg.Path, []byte(tok)) {
		if err := writeFileAtomic(cfg.Path, []byte(tok), 0o644); err != nil {
			return 0, err
		}
	}
	return time.Duration(float64(exp.Sub(minted)) * refreshFraction), nil
}

// writePrepared writes data into the empty regular file at path (made by
// PrepareTokenFile) and reports whether it did. Anything else there — no
// file, a symlink (not followed), a file that is not empty — is left for
// the atomic replacement. The file is made 0644, nothing else, so its mode
// is not set again here.
func writePrepared(path string, data []byte) bool {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size != 0 || st.Nlink != 1 {
		unix.Close(fd)
		return false
	}
	n, err := unix.Write(fd, data)
	if cerr := unix.Close(fd); err == nil {
		err = cerr
	}
	if err != nil || n != len(data) {
		// Whatever was written is replaced whole.
		return false
	}
	return true
}

// writeFileAtomic replaces path with data: a reader sees the old or the new
// content, never a partial file. Not synced: after a crash chalkd resumes
// the sandbox and mints its tokens again.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	if err := atomicfile.WriteFileNoSync(path, data, mode); err != nil {
		return fmt.Errorf("metadata: write %s: %w", path, err)
	}
	return nil
}
