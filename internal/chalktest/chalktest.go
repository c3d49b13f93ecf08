// Package chalktest runs a real chalkd for end-to-end tests: built from this
// tree, seeded with the busybox base image, inside a throwaway "node" network
// namespace (so its nftables table, veths and sandbox NAT never touch the host's
// network), serving the API on a unix socket.
//
// Tests using it need root; they skip with a clear message otherwise.
package chalktest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/pgtest"
)

// One PostgreSQL cluster (internal/pgtest) for a test binary's nodes that
// keep their store in PostgreSQL: started by the first PostgresDB, stopped
// by StopPostgres (the package's TestMain).
var (
	pgOnce    sync.Once
	pgCluster *pgtest.Cluster
	pgErr     error
)

// PostgresDB returns the URL of a fresh database (dropped when t ends) of
// the shared cluster, for chalkd --database. Without Debian's postgresql
// package it skips t, naming the package (fails under CHALK_TEST_POSTGRES=1).
func PostgresDB(t testing.TB) string {
	t.Helper()
	pgOnce.Do(func() { pgCluster, pgErr = pgtest.Start() })
	if errors.Is(pgErr, pgtest.ErrMissing) && !pgtest.Required() {
		t.Skip(pgErr)
	}
	if pgErr != nil {
		t.Fatal(pgErr)
	}
	return pgCluster.NewDatabase(t)
}

// StopPostgres stops the cluster PostgresDB started, if any.
func StopPostgres() {
	if pgCluster != nil {
		pgCluster.Stop()
	}
}

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
	// builtDir is binDir when Bin made it (not $CHALK_TEST_BIN): this
	// test binary's own, removed by Main when it exits.
	builtDir string
	// buildBin builds package pkg of the repository at root into out.
	buildBin = func(root, out, pkg string) error {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%v\n%s", err, out)
		}
		return nil
	}
)

// Main runs a package's tests (m.Run) and then removes what the test
// binary made that outlives its tests: the PostgreSQL cluster of
// PostgresDB and the directory Bin built the binaries in (one per test
// binary: packages run at once do not share it). A package using
// chalktest calls it from its TestMain: os.Exit(chalktest.Main(m)).
func Main(m *testing.M) int {
	code := m.Run()
	StopPostgres()
	RemoveBin()
	return code
}

// RemoveBin removes the directory Bin built the binaries in, if it did
// (not $CHALK_TEST_BIN); nothing may use them any more.
func RemoveBin() {
	if builtDir != "" {
		_ = os.RemoveAll(builtDir)
		builtDir = ""
	}
}

// Bin returns a directory holding chalkd, chalk and chalk-init built from this
// tree ($CHALK_TEST_BIN if set, as scripts/test.sh does).
func Bin(t TB) string {
	t.Helper()
	buildOnce.Do(func() {
		if d := os.Getenv("CHALK_TEST_BIN"); d != "" {
			binDir = d
			return
		}
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		binDir, buildErr = os.MkdirTemp("", "chalktest-bin-")
		if buildErr != nil {
			return
		}
		builtDir = binDir
		for _, b := range [][2]string{{"chalkd", "./cmd/chalkd"}, {"chalk", "./cmd/chalk"}, {"chalk-init", "./cmd/chalk-init"}} {
			if err := buildBin(root, filepath.Join(binDir, b[0]), b[1]); err != nil {
				buildErr = fmt.Errorf("build %s: %w", b[0], err)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

// BuildRev returns a directory holding chalkd, chalk and chalk-init built
// from git revision rev of this repository ($CHALK_TEST_OLD_BIN if set), for
// upgrade tests.
func BuildRev(t testing.TB, rev string) string {
	t.Helper()
	if d := os.Getenv("CHALK_TEST_OLD_BIN"); d != "" {
		return d
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	// A shallow clone (or a source tarball) has no old commits, and the
	// machines cannot fetch them: say so rather than fail on a missing rev.
	if out, err := exec.Command("git", "-C", root, "cat-file", "-e", rev+"^{commit}").CombinedOutput(); err != nil {
		t.Skipf("commit %s is not in this checkout (shallow clone?): %v %s; run in a full clone or set CHALK_TEST_OLD_BIN to that commit's binaries", rev, err, out)
	}
	archive := exec.Command("sh", "-c", `git -C "$1" archive "$2" | tar -x -C "$3"`, "sh", root, rev, src)
	if out, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("git archive %s: %v\n%s", rev, err, out)
	}
	for _, b := range [][2]string{{"chalkd", "./cmd/chalkd"}, {"chalk", "./cmd/chalk"}, {"chalk-init", "./cmd/chalk-init"}} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, b[0]), b[1])
		cmd.Dir = src
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build %s at %s: %v\n%s", b[0], rev, err, out)
		}
	}
	return dir
}

// RequireRoot skips the test unless it runs as root with runc available.
func RequireRoot(t TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: starts real sandboxes (runc, namespaces, nftables)")
	}
	if _, err := exec.LookPath("runc"); err != nil {
		t.Skip("needs runc (Debian package runc; scripts/deps.sh installs it)")
	}
}

// TB is the part of testing.TB chalktest needs to start chalkds: a test's
// *testing.T, or a harness of a command that starts them outside of a test
// (cmd/chalkbench's fleet rows).
type TB interface {
	Helper()
	Cleanup(func())
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
	Skip(args ...any)
	Skipf(format string, args ...any)
	TempDir() string
	Failed() bool
}

// Node is a chalkd under test.
type Node struct {
	t      TB
	Dir    string // data dir
	RunDir string
	Netns  string // name of the node's network namespace
	Socket string
	Cgroup string
	Args   []string // extra chalkd flags
	BinDir string   // where chalkd, chalk and chalk-init come from (default Bin); Restart uses the current one
	Env    []string // extra environment of chalkd (test hooks); Restart uses the current one
	// Mode is chalkd's mode: "" (all-in-one), "control" or "node" (fleet.go).
	Mode    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Start starts a chalkd in a fresh node netns, seeded with busybox. Everything
// is removed when the test ends.
func Start(t TB, extraArgs ...string) *Node {
	return StartWith(t, nil, extraArgs...)
}

// StartWith is Start with the node's uplink attached to inet (nil: no uplink).
func StartWith(t TB, inet *FakeInternet, extraArgs ...string) *Node {
	return StartOpts(t, Options{Internet: inet, Args: extraArgs})
}

// Options configure StartOpts.
type Options struct {
	Internet *FakeInternet // the node's uplink (nil: none)
	Python   bool          // also seed python:3.11-slim-bookworm (debootstrap once per machine, cached)
	Args     []string      // extra chalkd flags
	BinDir   string        // binaries to run (default Bin: built from this tree)
	Env      []string      // extra environment of chalkd (KEY=value)
	Mode     string        // chalkd's mode: "" (all-in-one), "control" or "node"
	NoSeed   bool          // seed no base image (a fleet node pulls them from its control plane)
	// Before, if set, runs once the node's netns exists, before chalkd
	// starts (to link it to others, add flags).
	Before func(n *Node)
}

// PythonSeedCache is where the Python base layer is cached between test runs.
const PythonSeedCache = "/var/cache/chalk/seed"

// StartOpts starts a chalkd as configured by o.
func StartOpts(t TB, o Options) *Node {
	inet, extraArgs := o.Internet, o.Args
	t.Helper()
	RequireRoot(t)
	bin := o.BinDir
	if bin == "" {
		bin = Bin(t)
	}
	id := randHex(4)
	n := &Node{
		t:      t,
		BinDir: bin,
		Dir:    t.TempDir(),
		RunDir: filepath.Join("/run", "chalktest-"+id),
		Netns:  "chalkt-" + id,
		Cgroup: "/chalktest-" + id,
		Args:   extraArgs,
		Env:    o.Env,
		Mode:   o.Mode,
	}
	// t.TempDir's parent is 0700; sandbox roots (unprivileged host uids under
	// user namespaces) must pass through it to their rootfs, as through
	// chalkd's data dir (which chalkd makes 0711 itself).
	if err := os.Chmod(filepath.Dir(n.Dir), 0o711); err != nil {
		t.Fatal(err)
	}
	// CHALK_TEST_STORE=postgres keeps every node's store in PostgreSQL
	// (a database of its own), to run the suite on it (not an older chalkd
	// from BinDir, which may not know --database).
	if os.Getenv("CHALK_TEST_STORE") == "postgres" && o.BinDir == "" && !slices.Contains(n.Args, "--database") {
		tt, ok := t.(testing.TB)
		if !ok {
			t.Fatalf("chalktest: CHALK_TEST_STORE=postgres works in tests only")
		}
		db := PostgresDB(tt) // dropped after the node's cleanup (registered below)
		t.Logf("chalktest: the node's store is in PostgreSQL: %s", db)
		n.Args = append(n.Args, "--database", db)
	}
	n.Socket = filepath.Join(n.RunDir, "chalkd.sock")
	n.logPath = filepath.Join(n.Dir, "chalkd.log")
	if out, err := exec.Command("ip", "netns", "add", n.Netns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(n.cleanup)
	if out, err := exec.Command("ip", "-n", n.Netns, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v %s", err, out)
	}
	// CHALK_TEST_RUNTIME=runsc (runsc from CHALK_RUNSC, next to chalkd, or
	// on PATH) runs every node of the suite on gVisor.
	if rt := os.Getenv("CHALK_TEST_RUNTIME"); rt != "" && !slices.Contains(n.Args, "--runtime") {
		n.Args = append(n.Args, "--runtime", rt)
		b := os.Getenv("CHALK_RUNSC")
		if b == "" {
			b = filepath.Join(bin, "runsc") // scripts/gvisor.sh puts it next to chalkd
			if _, err := os.Stat(b); err != nil && o.BinDir != "" {
				// Other binaries (e.g. an older chalkd): this tree's runsc.
				b = filepath.Join(Bin(t), "runsc")
			}
		}
		if _, err := os.Stat(b); err == nil && rt == "runsc" {
			n.Args = append(n.Args, "--runtime-binary", b)
		}
	}
	if inet != nil {
		inet.Attach(n.Netns)
		n.Args = append(n.Args, "--dns-upstream", inet.DNS)
	}
	seedArgs := []string{filepath.Join(bin, "chalkd"), "seed", "--data-dir", n.Dir, "--busybox"}
	if o.Python {
		seedArgs = append(seedArgs, "--python", "--cache-dir", PythonSeedCache)
	}
	// Seeding writes the registry's storage; it runs in the host's network
	// namespace because the Python base comes from the Debian mirror (as the
	// setup script does), cached across runs.
	if !o.NoSeed {
		seed := exec.Command(seedArgs[0], seedArgs[1:]...)
		if out, err := seed.CombinedOutput(); err != nil {
			t.Fatalf("chalkd seed: %v\n%s", err, out)
		}
	}
	if o.Before != nil {
		o.Before(n)
	}
	n.Restart()
	return n
}

// command runs argv inside the node's network namespace.
func (n *Node) command(argv ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=/run/netns/" + n.Netns, "--"}, argv...)...)
}

// Restart starts chalkd (again) on the same state and waits until it serves.
func (n *Node) Restart() {
	t := n.t
	t.Helper()
	from := len(n.Log()) // what earlier processes logged
	n.spawn()
	deadline := time.Now().Add(60 * time.Second)
	for {
		var err error
		if n.Mode == "node" {
			// A node agent serves no API: it is up once it says so (this
			// process: an earlier one's line does not count).
			if log := n.Log(); len(log) >= from && strings.Contains(log[from:], "chalkd node serving") {
				return
			}
			err = fmt.Errorf("not serving yet")
		} else if c, cerr := n.clientErr(); cerr != nil {
			err = cerr
		} else {
			_, err = c.WhoAmI(context.Background())
			if err == nil {
				return
			}
		}
		select {
		case <-n.exited:
			t.Fatalf("chalkd exited during start:\n%s", n.Log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("chalkd not serving after 60s (%v):\n%s", err, n.Log())
		}
		time.Sleep(20 * time.Millisecond) // polling an external process for readiness
	}
}

// RestartFails starts chalkd (again) on the same state, expecting it to
// fail to start: it waits, within a bound, until the process exits, and
// fails the test if a node agent says it serves first.
func (n *Node) RestartFails(within time.Duration) {
	t := n.t
	t.Helper()
	from := len(n.Log()) // what earlier processes logged
	n.spawn()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-n.exited:
			return
		case <-deadline.C:
			t.Fatalf("chalkd still runs %v after its start, want it to fail:\n%s", within, n.Log())
		case <-tick.C: // polling the log of an external process
			if n.Mode == "node" && strings.Contains(n.Log()[from:], "chalkd node serving") {
				t.Fatalf("chalkd node serves, want it to fail to start:\n%s", n.Log())
			}
		}
	}
}

// spawn starts the chalkd process on the node's state.
func (n *Node) spawn() {
	t := n.t
	t.Helper()
	if n.exited != nil {
		select {
		case <-n.exited:
		default:
			// A second chalkd on the same data dir would be orphaned by
			// cleanup (which ends only the newest).
			t.Fatal("chalktest: Restart while chalkd runs: Stop or Kill it first")
		}
	}
	args := []string{filepath.Join(n.BinDir, "chalkd")}
	if n.Mode != "" {
		args = append(args, n.Mode)
	}
	args = append(append(args,
		"--data-dir", n.Dir, "--run-dir", n.RunDir, "--listen", "", "--cgroup-parent", n.Cgroup,
		"--client-config", filepath.Join(n.Dir, "client.json"), "--log-level", "debug",
		"--init-binary", filepath.Join(n.BinDir, "chalk-init"), "--chalk-binary", filepath.Join(n.BinDir, "chalk"),
	), n.Args...)
	logf, err := os.OpenFile(n.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	n.cmd = n.command(args...)
	n.cmd.Env = append(os.Environ(), n.Env...)
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	n.exited = make(chan struct{})
	go func(c *exec.Cmd, ch chan struct{}) { _ = c.Wait(); close(ch) }(n.cmd, n.exited)
}

// Kill kills chalkd with SIGKILL (sandboxes keep running).
func (n *Node) Kill() {
	if n.cmd != nil && n.cmd.Process != nil {
		_ = n.cmd.Process.Signal(syscall.SIGKILL)
		<-n.exited
	}
}

// Freeze stops chalkd's process (SIGSTOP: silent, as behind a network
// partition; its sandboxes keep running); Thaw continues it (SIGCONT).
func (n *Node) Freeze() { n.signal(syscall.SIGSTOP) }

// Thaw continues a frozen chalkd (SIGCONT).
func (n *Node) Thaw() { n.signal(syscall.SIGCONT) }

func (n *Node) signal(sig syscall.Signal) {
	if n.cmd != nil && n.cmd.Process != nil {
		if err := n.cmd.Process.Signal(sig); err != nil {
			n.t.Fatalf("signal %v to chalkd: %v", sig, err)
		}
	}
}

// Stop stops chalkd gracefully.
func (n *Node) Stop() {
	if n.cmd != nil && n.cmd.Process != nil {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		<-n.exited
	}
}

// Pid is chalkd's process id (0 before it started).
func (n *Node) Pid() int {
	if n.cmd == nil || n.cmd.Process == nil {
		return 0
	}
	return n.cmd.Process.Pid
}

// Token is the admin token chalkd created.
func (n *Node) Token() string {
	b, err := os.ReadFile(filepath.Join(n.Dir, "admin.token"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func (n *Node) clientErr() (*chalkcompute.Client, error) {
	tok := n.Token()
	if tok == "" {
		return nil, fmt.Errorf("no admin token yet")
	}
	return chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(tok))
}

// Client is an admin SDK client for this node.
func (n *Node) Client() *chalkcompute.Client {
	n.t.Helper()
	c, err := n.clientErr()
	if err != nil {
		n.t.Fatal(err)
	}
	return c
}

// CLI runs the chalk CLI against this node and returns stdout, stderr and the exit code.
func (n *Node) CLI(args ...string) (string, string, int) {
	cmd := exec.Command(filepath.Join(Bin(n.t), "chalk"), append([]string{"--api-url", "unix://" + n.Socket, "--token", n.Token()}, args...)...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		n.t.Fatalf("chalk %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// Exec runs a command in the node's network namespace (to inspect what chalkd did).
func (n *Node) Exec(argv ...string) (string, error) {
	out, err := n.command(argv...).CombinedOutput()
	return string(out), err
}

// Log returns chalkd's log so far.
func (n *Node) Log() string {
	b, _ := os.ReadFile(n.logPath)
	return string(b)
}

func (n *Node) cleanup() {
	if n.t.Failed() {
		n.t.Logf("chalkd log:\n%s", tailStr(n.Log(), 8000))
	}
	n.Stop()
	// Kill whatever sandboxes are left, then remove their state.
	runcRoot := filepath.Join(n.RunDir, "runc")
	if out, err := exec.Command("runc", "--root", runcRoot, "list", "-q").Output(); err == nil {
		for _, id := range strings.Fields(string(out)) {
			_ = exec.Command("runc", "--root", runcRoot, "delete", "--force", id).Run()
		}
	}
	// `runc list` knows no gVisor sandbox (runsc keeps its own state under
	// the same root): whatever still runs in the node's cgroups (a runsc
	// sandbox's runsc-sandbox, gofer and their children, or anything runc
	// left) is killed, so no test leaves sandboxes running behind it.
	if left := killCgroupTree(n.Cgroup); len(left) > 0 {
		n.t.Logf("chalktest: processes still in %s after SIGKILL: %v", n.Cgroup, left)
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && (strings.HasPrefix(f[4], n.Dir) || strings.HasPrefix(f[4], n.RunDir)) {
				_ = syscall.Unmount(f[4], syscall.MNT_DETACH)
			}
		}
	}
	_ = exec.Command("ip", "netns", "del", n.Netns).Run()
	for _, ctl := range []string{"memory", "pids", "cpu", "cpuacct", "cpuset", "blkio", "devices", "freezer", "systemd", "unified"} {
		base := filepath.Join("/sys/fs/cgroup", ctl, n.Cgroup)
		ents, _ := os.ReadDir(base)
		for _, e := range ents {
			if e.IsDir() {
				// A sandbox's pids cgroup has the workload's child (sandbox.WorkloadCgroup).
				_ = os.Remove(filepath.Join(base, e.Name(), "workload"))
				_ = os.Remove(filepath.Join(base, e.Name()))
			}
		}
		_ = os.Remove(base)
	}
	_ = os.RemoveAll(n.RunDir)
}

func tailStr(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// Metric reads one unlabelled metric from chalkd's /metrics.
func (n *Node) Metric(name string) (float64, error) {
	// One connection per call, closed after it: a poll of go_goroutines
	// (TestNoLeaks) must not leave chalkd a kept-alive connection, and its
	// goroutine, per call.
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", n.Socket)
	}}}
	req, err := http.NewRequest(http.MethodGet, "http://chalkd/metrics", nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+n.Token()) // /metrics needs the admin token
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("metric %s not found", name)
}

// killCgroupTree sends SIGKILL to every process in cgroup (a path below
// the hierarchies' roots) and its descendants, in every v1 hierarchy and
// the unified one, and waits for each to exit (through a pidfd: the kill
// cannot reach a process that took a reused pid). It returns the pids
// still alive 10 s after their kill.
func killCgroupTree(cgroup string) []int {
	pids := map[int]bool{}
	roots, _ := filepath.Glob("/sys/fs/cgroup/*")
	roots = append(roots, "/sys/fs/cgroup")
	for _, root := range roots {
		_ = filepath.WalkDir(filepath.Join(root, cgroup), func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
				return nil
			}
			b, _ := os.ReadFile(path)
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
					pids[pid] = true
				}
			}
			return nil
		})
	}
	var fds []unix.PollFd
	byFd := map[int32]int{}
	for pid := range pids {
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue // gone already
		}
		if unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0) != nil {
			unix.Close(fd)
			continue
		}
		fds = append(fds, unix.PollFd{Fd: int32(fd), Events: unix.POLLIN})
		byFd[int32(fd)] = pid
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(fds) > 0 && time.Now().Before(deadline) {
		if _, err := unix.Poll(fds, int(time.Until(deadline).Milliseconds())+1); err != nil && err != unix.EINTR {
			break
		}
		fds = slices.DeleteFunc(fds, func(p unix.PollFd) bool {
			if p.Revents == 0 {
				return false
			}
			unix.Close(int(p.Fd))
			return true
		})
		for i := range fds {
			fds[i].Revents = 0
		}
	}
	var left []int
	for _, p := range fds {
		left = append(left, byFd[p.Fd])
		unix.Close(int(p.Fd))
	}
	slices.Sort(left)
	return left
}
