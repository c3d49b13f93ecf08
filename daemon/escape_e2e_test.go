package daemon_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/sandbox"
)

// The escape suite: real attempts, from inside a sandbox running as its root,
// to get out of it or to hurt the node or other sandboxes. Every attempt must
// fail, and the test checks what the sandbox sees when it does (the message
// names the mechanism that stopped it: capabilities, seccomp, a read-only
// mount, the network rules, a cgroup limit).

// escapeAttempt is one attempt and how it must fail.
type escapeAttempt struct {
	name   string
	script string // run with sh -c as the sandbox's root
	want   string // in stdout+stderr (case-insensitive): how it was refused; "a|b": either
	// absent, if set, must not appear in the output (a service banner, a secret).
	absent string
}

// onGVisor reports whether n runs its sandboxes on gVisor
// (CHALK_TEST_RUNTIME=runsc, or --runtime runsc).
func onGVisor(n *chalktest.Node) bool { return slices.Contains(n.Args, "runsc") }

// contained marks an attempt that gVisor lets succeed inside its Sentry
// (its own kernel state: its network stack, its emulated cgroupfs, its own
// user namespaces and log) without reaching the host; the test then checks
// the host side instead.
const contained = "<contained by gVisor>"

// gvisorOutcome is how attempts end on gVisor where that differs from runc:
// another refusal (gVisor's errno for the same denial) or contained.
var gvisorOutcome = map[string]string{
	"unshare user ns": contained,
	"write /proc/sys": msgEPERM,
	"core_pattern (runs a host program on a crash)": msgEPERM,
	"sysctl -w":                         contained,
	"raise the pids limit":              "invalid argument",
	"raise the memory limit":            contained,
	"new cgroup (release_agent escape)": contained,
	"network admin":                     "inappropriate ioctl",
	"kernel log":                        contained,
}

// runAttempts runs each attempt in sb and asserts it failed the expected way
// (on gVisor, as gvisorOutcome says where it differs).
func runAttempts(t *testing.T, n *chalktest.Node, sb *chalkcompute.Sandbox, attempts []escapeAttempt) {
	t.Helper()
	gv := onGVisor(n)
	for _, a := range attempts {
		t.Run(a.name, func(t *testing.T) {
			want := a.want
			if o, ok := gvisorOutcome[a.name]; ok && gv {
				want = o
			}
			res, err := sb.Exec(ctxT(t, 30*time.Second), []string{"sh", "-c", a.script})
			if err != nil {
				t.Fatalf("exec: %v", err)
			}
			out := string(res.Stdout) + string(res.Stderr)
			if a.absent != "" && strings.Contains(out, a.absent) {
				t.Errorf("%q: output %q contains %q", a.script, out, a.absent)
			}
			if want == contained {
				return // the caller checks the host
			}
			if res.Code == 0 {
				t.Fatalf("%q succeeded (exit 0), output %q", a.script, out)
			}
			if want != "" && !containsAny(strings.ToLower(out), strings.Split(want, "|")) {
				t.Errorf("%q: exit %d, output %q; want it refused with %q", a.script, res.Code, out, want)
			}
		})
	}
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// TestEscapePrivileged: mounts, namespaces, ptrace of init, kernel and cgroup
// knobs, modules, raw sockets, device nodes and the kernel log are all refused
// to a sandbox's root.
func TestEscapePrivileged(t *testing.T) {
	n := chalktest.Start(t)
	sb := create(t, n.Client(), chalkcompute.WithMemoryMB(512))
	// A fake kernel module: the loader must be refused before the kernel
	// looks at its contents.
	if err := sb.WriteFile(ctxT(t, 10*time.Second), "/tmp/evil.ko", []byte("\x7fELF not really a module"), 0o644); err != nil {
		t.Fatal(err)
	}
	const (
		denied   = msgDenied
		eperm    = msgEPERM
		readOnly = msgReadOnly
	)
	runAttempts(t, n, sb, []escapeAttempt{
		// Mounts need CAP_SYS_ADMIN.
		{"mount proc", "mkdir -p /tmp/m && mount -t proc proc /tmp/m", denied, ""},
		{"mount tmpfs", "mkdir -p /tmp/m && mount -t tmpfs t /tmp/m", denied, ""},
		{"bind mount", "mkdir -p /tmp/m && mount --bind / /tmp/m", denied, ""},
		{"remount root rw", "mount -o remount,rw /sys", denied, ""},
		// A new user namespace would hand back a full capability set in it:
		// seccomp refuses unshare/clone of namespaces without CAP_SYS_ADMIN.
		{"unshare user ns", "unshare -U id", eperm, ""},
		{"unshare user ns as root (-r)", "unshare -r sh -c 'mount -t tmpfs t /tmp'", eperm, ""},
		{"unshare mount ns", "unshare -m id", eperm, ""},
		{"unshare net ns", "unshare -n id", eperm, ""},
		// ptrace of init (no ptrace tool in busybox: /proc/1/mem and environ
		// need the same access check as PTRACE_ATTACH / PTRACE_MODE_READ).
		// Exec'd processes share init's uid, so this holds only because init
		// makes itself non-dumpable (prctl PR_SET_DUMPABLE 0).
		{"read init's memory", "dd if=/proc/1/mem of=/tmp/mem bs=4 count=1 skip=$((0x400000/4)) && od -c /tmp/mem", denied, "E   L   F"},
		{"read init's environ", "cat /proc/1/environ", denied, "PATH="},
		{"nsenter init's namespaces", "nsenter -t 1 -m -p id", denied + "|" + eperm, ""},
		// Kernel and cgroup knobs are read-only mounts.
		{"write /proc/sys", "echo 1 > /proc/sys/kernel/panic", readOnly, ""},
		{"sysctl -w", "sysctl -w net.ipv4.ip_forward=0", readOnly, ""},
		{"core_pattern (runs a host program on a crash)", "echo '|/tmp/x' > /proc/sys/kernel/core_pattern", readOnly, ""},
		{"write uevent_helper", "echo /tmp/x > /sys/kernel/uevent_helper", readOnly, ""},
		{"raise the pids limit", "f=/sys/fs/cgroup/pids/pids.max; [ -e $f ] || f=/sys/fs/cgroup/pids.max; echo max > $f", readOnly, ""},
		{"raise the memory limit", "f=/sys/fs/cgroup/memory/memory.limit_in_bytes; [ -e $f ] || f=/sys/fs/cgroup/memory.max; echo -1 > $f", readOnly, ""},
		{"new cgroup (release_agent escape)", "d=/sys/fs/cgroup/memory; [ -d $d ] || d=/sys/fs/cgroup; mkdir $d/escape", readOnly, ""},
		// Modules need CAP_SYS_MODULE (and seccomp refuses init_module).
		{"insmod", "insmod /tmp/evil.ko", eperm, ""},
		{"rmmod", "rmmod overlay", eperm, ""},
		// Raw sockets need CAP_NET_RAW.
		{"raw socket (ping)", "ping -c 1 -W 1 127.0.0.1", denied, ""},
		{"network admin", "ip link set lo down", eperm, ""},
		// Devices: no CAP_MKNOD and the device cgroup denies everything else.
		{"mknod the host disk", "mknod /tmp/sda b 8 0", eperm, ""},
		{"kernel log", "dmesg", eperm, ""},
		{"set the clock", "date -s 2000.01.01-00:00:00 >/dev/null; [ $(date +%Y) -lt 2001 ]", eperm, ""},
	})
	// Whatever was refused or contained, the host is as it was: the node
	// still forwards, the sandbox's limits and cgroups are the node's.
	if out, err := exec.Command("ip", "netns", "exec", n.Netns, "cat", "/proc/sys/net/ipv4/ip_forward").Output(); err != nil || strings.TrimSpace(string(out)) != "1" {
		t.Errorf("node's ip_forward after the attempts: %q %v", out, err)
	}
	if got := readInt(t, cgroupFile(n, "memory", sb.ID(), "memory.limit_in_bytes")); got != 512<<20 {
		t.Errorf("host memory limit of the sandbox after the attempts: %d, want %d", got, 512<<20)
	}
	if _, err := os.Stat(cgroupFile(n, "memory", sb.ID(), "escape")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a cgroup made from inside exists on the host: %v", err)
	}
}

// TestEscapeHostFiles: /proc/1/root (and every other path a sandbox has) is
// the sandbox's own root, not the host's.
func TestEscapeHostFiles(t *testing.T) {
	n := chalktest.Start(t)
	sb := create(t, n.Client())
	secret := "host-secret-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	hostFile := filepath.Join(t.TempDir(), "secret.txt")
	if err := os.WriteFile(hostFile, []byte(secret), 0o644); err != nil {
		t.Fatal(err)
	}
	// A process's root is the sandbox's root. (Init's own /proc/1/root is
	// not even readable: init is not dumpable.)
	if got := mustExec(t, sb, "readlink", "/proc/self/root"); got != "/\n" {
		t.Errorf("root as seen from the sandbox: %q, want /", got)
	}
	if got := mustExec(t, sb, "cat", "/proc/self/root/etc/hostname"); got != sb.ID()+"\n" {
		t.Errorf("/proc/self/root/etc/hostname: %q, want the sandbox's own %q", got, sb.ID())
	}
	// The sandbox's pid namespace holds only its own processes.
	if got := mustExec(t, sb, "sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"); !strings.HasPrefix(got, "/.chalk/bin/chalk-init ") {
		t.Errorf("pid 1 is not the sandbox's init: %q", got)
	}
	runAttempts(t, n, sb, []escapeAttempt{
		{"host file via /proc/1/root", "cat /proc/1/root" + hostFile, "permission denied", secret},
		{"host file via /proc/self/root/..", "cat /proc/self/root/../../.." + hostFile, "no such file", secret},
		{"chalkd's data dir via /proc/1/root", "ls /proc/1/root" + n.Dir, "permission denied", "chalkd.log"},
		{"host file via /proc/self/root", "cat /proc/self/root" + hostFile, "no such file", secret},
		{"host file via cwd of init", "cat /proc/1/cwd/../.." + hostFile, "permission denied", secret},
		{"host file via cwd", "cd /proc/self/cwd/../../.. && cat ." + hostFile, "no such file", secret},
		{"chroot escape", "mkdir -p /tmp/c && chroot /tmp/c /bin/sh -c 'cd ../../..; cat ." + hostFile + "'", "no such file", secret},
		{"host's pid 1 environment", "for p in /proc/[0-9]*; do grep -l chalkd $p/cmdline; done; exit 1", "", "chalkd"},
	})
}

// TestEscapeNetwork: nothing on the node (its service address, the gateway,
// the embedded registry) or in another sandbox is reachable.
func TestEscapeNetwork(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	a, b := create(t, c), create(t, c)
	ctx := ctxT(t, time.Minute)
	srv, err := b.Start(ctx, []string{"nc", "-ll", "-p", "8080", "-e", "echo", "from-b"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Signal(context.Background(), "KILL") })
	mustExec(t, b, "sh", "-c", "while ! netstat -ltn | grep -q :8080; do sleep 0.01; done")
	// b's service is up (reachable from inside b): a's failure below is the isolation.
	if out := mustExec(t, b, "sh", "-c", "timeout 3 nc 127.0.0.1 8080 </dev/null"); !strings.Contains(out, "from-b") {
		t.Fatalf("b's own service: %q", out)
	}
	n.Listen("10.213.0.1:9999")
	n.Listen("127.0.0.1:9998")
	gw := gateway(a.Info.Ip)
	get := "printf 'GET /v2/ HTTP/1.0\\r\\n\\r\\n' | timeout 3 nc "
	runAttempts(t, n, a, []escapeAttempt{
		{"another sandbox", "timeout 3 nc " + b.Info.Ip + " 8080 </dev/null; exit 1", "", "from-b"},
		{"node service address, other port", "timeout 3 nc 10.213.0.1 9999 </dev/null; exit 1", "", "node-service"},
		{"gateway, other port", "timeout 3 nc " + gw + " 9999 </dev/null; exit 1", "", "node-service"},
		{"node loopback via the gateway", "timeout 3 nc " + gw + " 9998 </dev/null; exit 1", "", "node-service"},
		{"embedded registry via the gateway", get + gw + " 7448; exit 1", "", "HTTP/"},
		{"embedded registry on the service address", get + "10.213.0.1 7448; exit 1", "", "HTTP/"},
		{"registry on the sandbox's own loopback", get + "127.0.0.1 7448; exit 1", "", "HTTP/"},
		{"spoofed source address", "ip addr add 10.213.0.1/32 dev lo", msgEPERM, ""},
	})
}

// How refusals read inside a busybox sandbox.
const (
	msgDenied   = "permission denied"       // EACCES, or busybox's "are you root?"
	msgEPERM    = "operation not permitted" // EPERM: capabilities or seccomp
	msgReadOnly = "read-only file system"   // EROFS: a read-only mount
)

// cgroupFile is a file of sandbox id's cgroup v1 controller ctl on the host.
func cgroupFile(n *chalktest.Node, ctl, id, file string) string {
	return filepath.Join("/sys/fs/cgroup", ctl, n.Cgroup, id, file)
}

func readInt(t *testing.T, path string) int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return v
}

// pollUntil calls cond until it is true or d passes (an external condition:
// a kernel counter, not one of our goroutines).
func pollUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestEscapeForkBomb: a fork bomb hits the pids limit and stays there; the
// node and other sandboxes stay usable; the bombed sandbox survives it.
func TestEscapeForkBomb(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	bombed := create(t, c)
	limit := readInt(t, cgroupFile(n, "pids", bombed.ID(), "pids.max"))
	if limit <= 0 || limit > 4096 {
		t.Fatalf("pids limit %d: want a default of at most 4096", limit)
	}
	ctx := ctxT(t, 2*time.Minute)
	// What the idle sandbox holds (init's threads count): the bomb must
	// drain back to about this.
	idle := readInt(t, cgroupFile(n, "pids", bombed.ID(), "pids.current"))
	t.Logf("idle sandbox: pids.current %d", idle)
	// With the workload's cgroup init makes threads when it needs them
	// (none ahead): those it made during the bomb are not the bomb's
	// (the sandbox's own tasks file lists init's threads but the forking one).
	initTasks := func() int64 {
		b, err := os.ReadFile(cgroupFile(n, "pids", bombed.ID(), "tasks"))
		if err != nil || !fileExists(cgroupFile(n, "pids", bombed.ID(), sandbox.WorkloadCgroup)) {
			return 0
		}
		return int64(len(strings.Fields(string(b))))
	}
	idleInit := initTasks()
	if work := cgroupFile(n, "pids", bombed.ID(), sandbox.WorkloadCgroup); fileExists(work) {
		// The workload's pids cgroup: what init starts is in it, with
		// init's headroom below the sandbox's limit, and cannot leave it.
		if wmax := readInt(t, filepath.Join(work, "pids.max")); wmax != limit-sandbox.InitPidsHeadroom {
			t.Errorf("workload pids.max %d, want the sandbox's %d less %d", wmax, limit, sandbox.InitPidsHeadroom)
		}
		if out := mustExec(t, bombed, "cat", "/proc/self/cgroup"); !strings.Contains(out, ":pids:/"+sandbox.WorkloadCgroup+"\n") {
			t.Errorf("an exec's cgroups:\n%s\nwant pids /%s", out, sandbox.WorkloadCgroup)
		}
		for _, f := range []string{"cgroup.procs", "tasks"} {
			res, err := bombed.Exec(ctx, []string{"sh", "-c", "echo $$ > /sys/fs/cgroup/pids/" + f})
			if err != nil {
				t.Fatal(err)
			}
			if res.Code == 0 {
				t.Errorf("a process of the sandbox moved itself out of the workload's pids cgroup (%s)", f)
			}
		}
	}
	// Each invocation forks two more and returns; /tmp/stop ends it (written
	// through the file API, which needs no fork).
	bomb, err := bombed.Start(ctx, []string{"sh", "-c", "f(){ [ -e /tmp/stop ] || { f | f & }; }; f; sleep 60"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = bomb.Signal(context.Background(), "KILL") })
	// The limit was hit (forks refused) and held. On runc with cgroup v1
	// the workload runs in a child of the sandbox's pids cgroup with a
	// lower limit (sandbox.WorkloadCgroup): that limit is the one hit.
	events := cgroupFile(n, "pids", bombed.ID(), "pids.events")
	if w := cgroupFile(n, "pids", bombed.ID(), sandbox.WorkloadCgroup+"/pids.events"); fileExists(w) {
		events = w
	}
	pollUntil(t, time.Minute, "the fork bomb to reach the pids limit", func() bool {
		b, _ := os.ReadFile(events)
		return strings.Contains(string(b), "max ") && !strings.Contains(string(b), "max 0")
	})
	if cur := readInt(t, cgroupFile(n, "pids", bombed.ID(), "pids.current")); cur > limit {
		t.Errorf("pids.current %d above the limit %d", cur, limit)
	}
	// While the bomb runs, the node creates and serves another sandbox.
	start := time.Now()
	other := create(t, c)
	if out := mustExec(t, other, "echo", "ok"); out != "ok\n" {
		t.Fatalf("other sandbox during the bomb: %q", out)
	}
	t.Logf("create+exec of another sandbox during the fork bomb: %v", time.Since(start))
	if onGVisor(n) {
		// gVisor's Sentry needs host threads; at the host pids limit it
		// can fail as a whole: the bombed sandbox may end (only it).
		_ = bomb.Signal(ctx, "KILL")
		if info, err := bombed.Refresh(ctx); err != nil || (info.State != "running" && info.State != "stopped") {
			t.Fatalf("bombed sandbox on gVisor: %v %+v", err, info)
		}
		if out := mustExec(t, other, "echo", "still ok"); out != "still ok\n" {
			t.Fatalf("other sandbox after the bomb: %q", out)
		}
		return
	}
	// Stop the bomb; the sandbox drains and serves again.
	if err := bombed.WriteFile(ctx, "/tmp/stop", nil, 0o644); err != nil {
		t.Fatalf("file API during the bomb: %v", err)
	}
	_ = bomb.Signal(ctx, "KILL")
	pollUntil(t, time.Minute, "the fork bomb to drain", func() bool {
		grown := max(initTasks()-idleInit, 0)
		return readInt(t, cgroupFile(n, "pids", bombed.ID(), "pids.current"))-grown <= idle+4
	})
	t.Logf("init's threads outside the workload's cgroup after the bomb: %d", initTasks())
	if out := mustExec(t, bombed, "echo", "survived"); out != "survived\n" {
		t.Fatalf("bombed sandbox after the bomb: %q", out)
	}
	if info, err := bombed.Refresh(ctx); err != nil || info.State != "running" {
		t.Fatalf("bombed sandbox state: %v %+v", err, info)
	}
}

// TestEscapeMemoryBomb: a memory bomb is OOM-killed inside its own sandbox
// only; as the entrypoint it ends its sandbox with end_reason "oom".
func TestEscapeMemoryBomb(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	bombed := create(t, c, chalkcompute.WithMemoryMB(64))
	neighbour := create(t, c, chalkcompute.WithMemoryMB(64))
	mustExec(t, neighbour, "sh", "-c", "echo alive > /tmp/state")
	// tail keeps everything it reads when there are no newlines.
	res, err := bombed.Exec(ctx, []string{"sh", "-c", "head -c 1000000000 /dev/zero | tail"})
	switch {
	case err != nil && onGVisor(n): // the sandbox ended under the exec (below)
	case err != nil:
		t.Fatal(err)
	case res.Code == 0:
		t.Fatalf("memory bomb was not killed: %+v", res.ExitStatus)
	}
	if oom := readOOMKills(t, cgroupFile(n, "memory", bombed.ID(), "memory.oom_control")); oom == 0 {
		t.Errorf("no OOM kill recorded in the bombed sandbox's cgroup")
	}
	if oom := readOOMKills(t, cgroupFile(n, "memory", neighbour.ID(), "memory.oom_control")); oom != 0 {
		t.Errorf("the neighbour saw %d OOM kills", oom)
	}
	survivors := []*chalkcompute.Sandbox{bombed, neighbour}
	if onGVisor(n) {
		// The kernel's OOM killer picks gVisor's Sentry (the sandbox's
		// kernel) as a whole: the bombed sandbox ends, with reason oom.
		info, err := bombed.Wait(ctx)
		if err != nil || info.State != "stopped" || info.EndReason != "oom" {
			t.Fatalf("bombed sandbox on gVisor: %v, state %q end_reason %q", err, info.State, info.EndReason)
		}
		survivors = survivors[1:]
	}
	for _, sb := range survivors {
		if info, err := sb.Refresh(ctx); err != nil || info.State != "running" {
			t.Fatalf("%s after the bomb: %v %+v", sb.ID(), err, info)
		}
	}
	if !onGVisor(n) {
		if out := mustExec(t, bombed, "echo", "init survived"); out != "init survived\n" {
			t.Fatalf("bombed sandbox: %q", out)
		}
	}
	if out := mustExec(t, neighbour, "cat", "/tmp/state"); out != "alive\n" {
		t.Fatalf("neighbour: %q", out)
	}
	// The bomb as the entrypoint: the sandbox ends, and says why.
	ep := create(t, c, chalkcompute.WithMemoryMB(32), chalkcompute.WithEntrypoint("sh", "-c", "head -c 1000000000 /dev/zero | tail"))
	info, err := ep.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State != "stopped" || info.EndReason != "oom" {
		t.Fatalf("entrypoint memory bomb: state %q end_reason %q exit %d", info.State, info.EndReason, info.ExitCode)
	}
	if out := mustExec(t, neighbour, "echo", "ok"); out != "ok\n" {
		t.Fatalf("neighbour after the entrypoint bomb: %q", out)
	}
}

// readOOMKills reads oom_kill from a cgroup v1 memory.oom_control.
func readOOMKills(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			k, _ := strconv.Atoi(strings.TrimSpace(v))
			return k
		}
	}
	t.Fatalf("%s has no oom_kill line: %q", path, b)
	return 0
}

// sandboxDisk is the quota filesystem of sandbox id on the host.
func sandboxDisk(t *testing.T, n *chalktest.Node, id string) (used, size int64) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Join(n.Dir, "sandboxes", id), &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.TMPFS_MAGIC {
		t.Fatalf("sandbox %s directory is not its own quota filesystem (type %#x)", id, st.Type)
	}
	bs := int64(st.Bsize)
	return (int64(st.Blocks) - int64(st.Bfree)) * bs, int64(st.Blocks) * bs
}

// TestEscapeDiskFill: filling the disk stops at the sandbox's quota (ENOSPC
// inside, nothing beyond it on the node); the sandbox and its neighbours keep
// working; the quota comes from the API, the SDK and the CLI.
func TestEscapeDiskFill(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	full := create(t, c, chalkcompute.WithDiskMB(32))
	neighbour := create(t, c)
	if _, size := sandboxDisk(t, n, full.ID()); size != 32<<20 {
		t.Fatalf("quota of a 32 MiB sandbox: %d bytes", size)
	}
	if _, size := sandboxDisk(t, n, neighbour.ID()); size != 1<<30 {
		t.Fatalf("default quota: %d bytes, want 1 GiB (capped at the default memory limit)", size)
	}
	res, err := full.Exec(ctx, []string{"dd", "if=/dev/zero", "of=/fill", "bs=1M", "count=200"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Code == 0 || !strings.Contains(string(res.Stderr), "No space left on device") {
		t.Fatalf("fill: exit %d, %q", res.Code, res.Stderr)
	}
	if used, size := sandboxDisk(t, n, full.ID()); used > size || used < size-(2<<20) {
		t.Fatalf("after the fill: %d of %d bytes used", used, size)
	}
	if got := mustExec(t, full, "df", "-m", "/"); !strings.Contains(got, "100%") && !onGVisor(n) { // gVisor's df shows its own view
		t.Errorf("df inside the full sandbox: %q", got)
	}
	// The file API is held by the same quota.
	if err := full.WriteFile(ctx, "/more.bin", make([]byte, 8<<20), 0o644); err == nil {
		t.Error("file API wrote past the quota")
	}
	// The sandbox keeps working, and deleting frees space.
	if out := mustExec(t, full, "sh", "-c", "rm /fill && echo freed > /note && cat /note"); out != "freed\n" {
		t.Fatalf("after freeing: %q", out)
	}
	if out := mustExec(t, neighbour, "sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=64 2>/dev/null && ls -l /fill | awk '{print $5}'"); out != fmt.Sprint(64<<20)+"\n" {
		t.Fatalf("neighbour writing within its own quota: %q", out)
	}
	// Bad quotas are refused with the field named.
	if _, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithDiskMB(-1)); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "disk_mb") {
		t.Fatalf("negative disk: %v", err)
	}
	// The CLI flag.
	out, stderr, code := n.CLI("compute", "sandbox", "create", "--image", "busybox", "--disk", "16", "-o", "json")
	var sb map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &sb) != nil {
		t.Fatalf("cli create --disk: %d %q %q", code, out, stderr)
	}
	if _, size := sandboxDisk(t, n, sb["id"].(string)); size != 16<<20 {
		t.Fatalf("cli --disk 16: quota %d bytes", size)
	}
}

// compatSyscallELF is a minimal static amd64 program that calls exit(42)
// through the i386 ABI (int 0x80) and, if that call returns, exit(7)
// through the native one: 42 means the compat system call reached the
// kernel, 7 that it was refused with an error.
func compatSyscallELF() []byte {
	code := []byte{
		0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1 (i386 exit)
		0xbb, 0x2a, 0x00, 0x00, 0x00, // mov ebx, 42
		0xcd, 0x80, // int 0x80
		0xbf, 0x07, 0x00, 0x00, 0x00, // mov edi, 7
		0xb8, 0x3c, 0x00, 0x00, 0x00, // mov eax, 60 (exit)
		0x0f, 0x05, // syscall
	}
	const base, ehsize, phsize = 0x400000, 64, 56
	b := make([]byte, 0, ehsize+phsize+len(code))
	le := func(v uint64, n int) {
		for i := range n {
			b = append(b, byte(v>>(8*i)))
		}
	}
	b = append(b, 0x7f, 'E', 'L', 'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
	le(2, 2)                               // ET_EXEC
	le(0x3e, 2)                            // x86-64
	le(1, 4)                               // version
	le(base+ehsize+phsize, 8)              // entry
	le(ehsize, 8)                          // program headers
	le(0, 8)                               // no section headers
	le(0, 4)                               // flags
	le(ehsize, 2)                          // header size
	le(phsize, 2)                          // program header size
	le(1, 2)                               // one
	le(0, 2)                               // section header size
	le(0, 2)                               // none
	le(0, 2)                               // no string table
	le(1, 4)                               // PT_LOAD
	le(5, 4)                               // r-x
	le(0, 8)                               // from offset 0
	le(base, 8)                            // vaddr
	le(base, 8)                            // paddr
	le(ehsize+phsize+uint64(len(code)), 8) // file size
	le(ehsize+phsize+uint64(len(code)), 8) // memory size
	le(0x1000, 8)                          // alignment
	return append(b, code...)
}

// TestEscapeCompatSyscalls: the seccomp filter lists only the native ABI, so
// a system call through the i386 entry point (int 0x80) kills the process
// with SIGSYS instead of reaching the kernel's compat code.
func TestEscapeCompatSyscalls(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the probe is amd64 machine code")
	}
	n := chalktest.Start(t)
	sb := create(t, n.Client())
	ctx := ctxT(t, time.Minute)
	if err := sb.WriteFile(ctx, "/tmp/compat", compatSyscallELF(), 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := sb.Exec(ctx, []string{"/tmp/compat"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("i386 exit(42) through int 0x80: %+v", res.ExitStatus)
	if res.Code == 42 {
		t.Fatalf("the i386 system call reached the kernel: %+v", res.ExitStatus)
	}
	if onGVisor(n) {
		return // gVisor's Sentry has no i386 ABI: refused or killed, never the host's compat code
	}
	if res.Signal != "SIGSYS" {
		t.Fatalf("i386 system call: %+v, want the process killed by SIGSYS (seccomp: native ABI only)", res.ExitStatus)
	}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
