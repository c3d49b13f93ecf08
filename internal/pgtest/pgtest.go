// Package pgtest starts a throwaway PostgreSQL cluster for tests, from
// Debian's postgresql package: initdb and pg_ctl in a temp dir (as the
// postgres user when run as root), listening only on a unix socket in that
// dir, fsync off. A package's TestMain starts one and stops it at the end;
// each test takes a fresh database of it.
//
// Without the package the tests that need it skip, naming it, unless
// CHALK_TEST_POSTGRES=1 (set by scripts/test.sh): then they fail.
package pgtest

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver
)

// Package is the Debian package the cluster comes from.
const Package = "postgresql"

// Required reports whether PostgreSQL tests must run (CHALK_TEST_POSTGRES=1).
func Required() bool { return os.Getenv("CHALK_TEST_POSTGRES") == "1" }

// ErrMissing is returned by Start when no PostgreSQL server binaries are installed.
var ErrMissing = errors.New("PostgreSQL tests need Debian's " + Package + " package (apt-get install " + Package + "); CHALK_TEST_POSTGRES=1 makes its absence a failure")

// installRoot is where Debian's postgresql-<major> packages install.
var installRoot = "/usr/lib/postgresql"

// bindir finds the newest installRoot/<major>/bin with initdb.
func bindir() (string, error) {
	ms, _ := filepath.Glob(filepath.Join(installRoot, "*", "bin", "initdb"))
	if len(ms) == 0 {
		if p, err := exec.LookPath("initdb"); err == nil {
			return filepath.Dir(p), nil
		}
		return "", ErrMissing
	}
	sort.Slice(ms, func(i, j int) bool {
		a, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(ms[i]))))
		b, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(ms[j]))))
		return a < b
	})
	return filepath.Dir(ms[len(ms)-1]), nil
}

// Cluster is a running PostgreSQL server.
type Cluster struct {
	dir, bin string
	cred     *syscall.Credential // the postgres user's, when started by root
	next     atomic.Int64
	admin    *sql.DB
	server   *exec.Cmd
	exited   chan struct{}
}

// Start initialises and starts a cluster in a new temp dir.
func Start() (*Cluster, error) {
	bin, err := bindir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "chalk-pg-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir, bin: bin}
	if os.Geteuid() == 0 {
		// PostgreSQL refuses to run as root.
		u, err := user.Lookup("postgres")
		if err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("the postgres user (made by the %s package): %w", Package, err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		c.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	data := filepath.Join(dir, "data")
	if out, err := c.run("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %v\n%s", err, out)
	}
	// The server runs as our child (not daemonised by pg_ctl), and gets
	// SIGQUIT (immediate shutdown) if the test binary dies first, e.g. at
	// a go test -timeout: no cluster outlives its tests.
	c.server = c.command("postgres", "-D", data, "-k", dir, "-c", "listen_addresses=",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=32MB")
	c.server.SysProcAttr.Pdeathsig = syscall.SIGQUIT
	logf, err := os.Create(filepath.Join(dir, "log"))
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	c.server.Stdout, c.server.Stderr = logf, logf
	if err := c.server.Start(); err != nil {
		logf.Close()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("postgres: %w", err)
	}
	logf.Close()
	c.exited = make(chan struct{})
	go func() { _ = c.server.Wait(); close(c.exited) }()
	if c.admin, err = sql.Open("pgx", c.url("postgres")); err != nil {
		c.Stop()
		return nil, err
	}
	// Wait until it accepts connections (polling another process, bounded).
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := c.admin.PingContext(ctx)
		cancel()
		if err == nil {
			return c, nil
		}
		select {
		case <-c.exited:
			log, _ := os.ReadFile(filepath.Join(dir, "log"))
			c.Stop()
			return nil, fmt.Errorf("postgres exited at start: %s", log)
		default:
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "log"))
			c.Stop()
			return nil, fmt.Errorf("postgres not accepting connections after 60s (%v): %s", err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// command is tool of the server's bin dir, run in the cluster's dir (as
// the postgres user when we are root: PostgreSQL refuses to run as root).
func (c *Cluster) command(tool string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(c.bin, tool), args...)
	cmd.Dir = c.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	return cmd
}

func (c *Cluster) run(tool string, args ...string) ([]byte, error) {
	return c.command(tool, args...).CombinedOutput()
}

func (c *Cluster) url(db string) string {
	return "postgres:///" + db + "?host=" + c.dir + "&user=postgres&sslmode=disable"
}

// Dir is the cluster's directory (its unix socket is in it).
func (c *Cluster) Dir() string { return c.dir }

// NewDatabase creates an empty database and returns its URL. The database
// is dropped when t ends.
func (c *Cluster) NewDatabase(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("t%d_%d", os.Getpid(), c.next.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.admin.ExecContext(ctx, `CREATE DATABASE `+name); err != nil {
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := c.admin.ExecContext(ctx, `DROP DATABASE `+name+` WITH (FORCE)`); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	return c.url(name)
}

// Stop stops the server (immediately: its data is thrown away) and removes its dir.
func (c *Cluster) Stop() {
	if c.admin != nil {
		c.admin.Close()
	}
	if c.server != nil && c.server.Process != nil {
		_ = c.server.Process.Signal(syscall.SIGQUIT)
		<-c.exited
	}
	os.RemoveAll(c.dir)
}

// Main is a TestMain body: it starts a cluster into *c (left nil, with the
// reason in *why, when the package is missing and not required), runs the
// tests and stops the cluster.
func Main(m *testing.M, c **Cluster, why *string) int {
	cl, err := Start()
	switch {
	case err == nil:
		*c = cl
		defer cl.Stop()
	case errors.Is(err, ErrMissing) && !Required():
		*why = err.Error()
	default:
		fmt.Fprintln(os.Stderr, "pgtest:", err)
		return 1
	}
	return m.Run()
}

// Skip skips t when there is no cluster (c nil), naming why.
func Skip(t testing.TB, c *Cluster, why string) {
	t.Helper()
	if c == nil {
		if strings.TrimSpace(why) == "" {
			why = ErrMissing.Error()
		}
		t.Skip(why)
	}
}
