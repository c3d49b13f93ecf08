package sandboxnet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/nettest"
)

// nsInode is the namespace inode behind a namespace file.
func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// ownerOf is the inode of the user namespace owning the namespace at path.
func ownerOf(t *testing.T, path string) uint64 {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	owner, err := unix.IoctlRetInt(fd, unix.NS_GET_USERNS)
	if err != nil {
		t.Fatalf("NS_GET_USERNS %s: %v", path, err)
	}
	defer unix.Close(owner)
	var st unix.Stat_t
	if err := unix.Fstat(owner, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// TestUserNS: with UserNS each sandbox's network namespace is owned by a user
// namespace of its own, bind-mounted for runc, mapping 0..65535 to the
// slot's host range; Teardown and Leftovers know the file; the pool's
// holders do not outlive Close.
func TestUserNS(t *testing.T) {
	for _, pool := range []int{2, -1} {
		t.Run(fmt.Sprintf("pool=%d", pool), func(t *testing.T) {
			m := newNode(t, Config{NetnsPool: pool, UserNS: true})
			// The spares' holders outlive the (discarded) thread that
			// filled the pool: their maps are written only at Setup.
			m.pool.wait()
			m.pool.mu.Lock()
			for _, sp := range m.pool.ready {
				b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", sp.holder.cmd.Process.Pid))
				if f := strings.Fields(string(b)); err != nil || len(f) < 3 || f[2] == "Z" || f[2] == "X" {
					t.Errorf("holder %d of a ready spare: %v %q, want it alive", sp.holder.cmd.Process.Pid, err, f)
				}
			}
			m.pool.mu.Unlock()
			a := setup(t, m, "sb-ua", 3)
			b := setup(t, m, "sb-ub", 4)
			for _, n := range []*Net{a, b} {
				u := n.UserNS
				if u == nil || u.Path != m.UserNSDir()+"/"+n.ID || u.HostID != DefaultUIDBase+uint32(n.Slot)*IDsPerSandbox || u.Size != IDsPerSandbox {
					t.Fatalf("%s: user namespace %+v", n.ID, u)
				}
				if got, want := ownerOf(t, n.NetnsPath), nsInode(t, u.Path); got != want {
					t.Errorf("%s: netns owned by user namespace %d, want its own %d", n.ID, got, want)
				}
				for _, f := range []string{"uid_map", "gid_map"} {
					out, err := exec.Command("nsenter", "--user="+u.Path, "cat", "/proc/self/"+f).CombinedOutput()
					if err != nil {
						t.Fatalf("nsenter %s: %v %s", u.Path, err, out)
					}
					if got := strings.Fields(string(out)); len(got) != 3 || got[0] != "0" || got[1] != fmt.Sprint(u.HostID) || got[2] != "65536" {
						t.Errorf("%s %s: %q", n.ID, f, out)
					}
				}
				// Lookup (a restarted daemon) finds the same.
				if l := m.Lookup(n.ID, n.Slot); *l.UserNS != *u {
					t.Errorf("Lookup: %+v, Setup: %+v", l.UserNS, u)
				}
			}
			if nsInode(t, a.UserNS.Path) == nsInode(t, b.UserNS.Path) {
				t.Fatal("two sandboxes share a user namespace")
			}
			left, err := m.Leftovers(context.Background(), map[string]int{"sb-ub": 4})
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(strings.Join(left, " "), "userns:sb-ua") || strings.Contains(strings.Join(left, " "), "userns:sb-ub") {
				t.Errorf("leftovers with only sb-ub live: %v", left)
			}
			if err := m.Teardown(context.Background(), "sb-ua", 3); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(a.UserNS.Path); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("user namespace file after teardown: %v", err)
			}
			// The slot's range comes back with the slot.
			again := setup(t, m, "sb-uc", 3)
			if again.UserNS.HostID != a.UserNS.HostID || nsInode(t, again.UserNS.Path) == 0 {
				t.Errorf("slot 3 again: %+v", again.UserNS)
			}
		})
	}
}

// TestUserNSRange: a uid base whose last range would pass the last valid
// uid is refused at New, naming the problem.
func TestUserNSRange(t *testing.T) {
	_, err := New(Config{UserNS: true, UIDBase: 3 << 30, NetnsDir: t.TempDir()})
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "uid base") {
		t.Fatalf("base 3·2^30 with 16383 slots: %v", err)
	}
	if _, err := New(Config{UserNS: true, NetnsDir: t.TempDir()}); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	// Without user namespaces, nothing changes.
	m, err := New(Config{NetnsDir: t.TempDir()})
	if err != nil || m.Lookup("x", 1).UserNS != nil {
		t.Fatalf("no userns: %v %+v", err, m.Lookup("x", 1))
	}
}

// TestHolderCommands: both holder commands (a static busybox's applets,
// preferred, and util-linux's unshare with coreutils' cat) make a holder in
// a user namespace of its own that owns a network namespace of its own,
// whose maps can be written once, and that exits and is reaped once
// released; holderArgv picks busybox when a static one is on PATH and
// util-linux's otherwise.
func TestHolderCommands(t *testing.T) {
	requireNode(t)
	var cmds [][]string
	if bb, err := exec.LookPath("busybox"); err == nil && isStatic(bb) {
		cmds = append(cmds, []string{bb, "unshare", "--user", "--net", "--", bb, "cat"})
		argv, err := holderArgv()
		if err != nil || len(argv) == 0 || argv[0] != bb {
			t.Errorf("holderArgv with static %s on PATH = %q, %v; want busybox's", bb, argv, err)
		}
	} else {
		t.Log("no static busybox on PATH: only util-linux's holder checked")
	}
	// PATH without busybox: util-linux's unshare and coreutils' cat.
	noBB := t.TempDir()
	for _, name := range []string{"unshare", "cat"} {
		bin, err := exec.LookPath(name)
		if err != nil {
			t.Skipf("no %s: %v", name, err)
		}
		if err := os.Symlink(bin, noBB+"/"+name); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", noBB)
	argv, err := holderArgv()
	if err != nil || len(argv) != 5 || argv[0] != noBB+"/unshare" || argv[4] != noBB+"/cat" {
		t.Fatalf("holderArgv without busybox = %q, %v", argv, err)
	}
	cmds = append(cmds, argv)
	for _, argv := range cmds {
		h, ns, err := startHolder(argv)
		if err != nil {
			t.Fatalf("%q: %v", argv, err)
		}
		pid := h.cmd.Process.Pid
		userNS := fmt.Sprintf("/proc/%d/ns/user", pid)
		if nsInode(t, userNS) == nsInode(t, "/proc/self/ns/user") || nsInode(t, fmt.Sprintf("/proc/%d/ns/net", pid)) == nsInode(t, "/proc/self/ns/net") {
			t.Errorf("%q: holder shares our namespaces", argv)
		}
		var st unix.Stat_t
		if err := unix.Fstat(int(ns), &st); err != nil || st.Ino != nsInode(t, fmt.Sprintf("/proc/%d/ns/net", pid)) {
			t.Errorf("%q: handle is not the holder's netns: %v", argv, err)
		}
		if got, want := ownerOf(t, fmt.Sprintf("/proc/%d/ns/net", pid)), nsInode(t, userNS); got != want {
			t.Errorf("%q: netns owned by %d, want the holder's user namespace %d", argv, got, want)
		}
		if err := h.mapIDs(DefaultUIDBase, IDsPerSandbox); err != nil {
			t.Errorf("%q: map: %v", argv, err)
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/uid_map", pid)); err != nil || strings.Join(strings.Fields(string(b)), " ") != fmt.Sprintf("0 %d %d", DefaultUIDBase, IDsPerSandbox) {
			t.Errorf("%q: uid_map %q %v", argv, b, err)
		}
		ns.Close()
		h.release()
		// release lets it exit and reaps it in the background: /proc/pid
		// goes once it is reaped (a zombie keeps it).
		deadline := time.Now().Add(10 * time.Second)
		for {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); errors.Is(err, os.ErrNotExist) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%q: holder %d still there 10s after release", argv, pid)
			}
			runtime.Gosched()
		}
	}
}

// BenchmarkHolder: one holder's life (start, namespaces ready, release,
// reaped) with each command; reports the CPU of this process and its reaped
// children per holder (steadier than wall time on a loaded machine).
func BenchmarkHolder(b *testing.B) {
	requireNode(b)
	cmds := map[string][]string{}
	if bin, err := exec.LookPath("busybox"); err == nil && isStatic(bin) {
		cmds["busybox"] = []string{bin, "unshare", "--user", "--net", "--", bin, "cat"}
	}
	u, err1 := exec.LookPath("unshare")
	c, err2 := exec.LookPath("cat")
	if err1 == nil && err2 == nil {
		cmds["util-linux"] = []string{u, "--user", "--net", "--", c}
	}
	for _, name := range []string{"busybox", "util-linux"} {
		argv, ok := cmds[name]
		if !ok {
			continue
		}
		b.Run(name, func(b *testing.B) {
			cpu := func() time.Duration {
				var self, kids unix.Rusage
				_ = unix.Getrusage(unix.RUSAGE_SELF, &self)
				_ = unix.Getrusage(unix.RUSAGE_CHILDREN, &kids)
				return time.Duration(self.Utime.Nano() + self.Stime.Nano() + kids.Utime.Nano() + kids.Stime.Nano())
			}
			c0 := cpu()
			for i := 0; i < b.N; i++ {
				h, ns, err := startHolder(argv)
				if err != nil {
					b.Fatal(err)
				}
				ns.Close()
				h.stdin.Close()
				h.stdin = nil
				_ = h.cmd.Wait()
			}
			b.ReportMetric(float64(cpu()-c0)/float64(b.N)/1e6, "cpu-ms/op")
		})
	}
}

// TestBegin: Begin returns with the namespace files in place and the user
// namespace mapped (what runc needs to start the container), from a spare
// of the pool or one made inline; Wait returns the configured network. A
// failure of the background part (here the anti-spoofing elements: the
// table is gone) is Wait's error and leaves nothing behind: no netns or
// userns file, no veth, spare or not.
func TestBegin(t *testing.T) {
	ctx := context.Background()
	for _, pool := range []int{2, -1} {
		t.Run(fmt.Sprintf("pool=%d", pool), func(t *testing.T) {
			m := newNode(t, Config{NetnsPool: pool, UserNS: true})
			m.pool.wait()
			p, err := m.Begin(ctx, "sb-begin", 5)
			if err != nil {
				t.Fatal(err)
			}
			n := p.Net
			if _, err := os.Stat(n.NetnsPath); err != nil {
				t.Errorf("netns file after Begin: %v", err)
			}
			if got, want := ownerOf(t, n.NetnsPath), nsInode(t, n.UserNS.Path); got != want {
				t.Errorf("netns owned by user namespace %d, want %d", got, want)
			}
			got, err := p.Wait()
			if err != nil {
				t.Fatal(err)
			}
			l, err := netlink.LinkByName(n.HostIf)
			if err != nil || l.Attrs().Alias != "sb-begin" || l.Attrs().Flags&net.FlagUp == 0 {
				t.Fatalf("%s after Wait: %v %v", n.HostIf, l, err)
			}
			h := nettest.OpenNetns(n.NetnsPath).Handle(t)
			addrs, err := h.AddrList(nil, netlink.FAMILY_V4)
			if err != nil || !hasAddr(addrs, got.SandboxIP) {
				t.Fatalf("sandbox addresses %v %v, want %s", addrs, err, got.SandboxIP)
			}
			if err := m.Teardown(ctx, "sb-begin", 5); err != nil {
				t.Fatal(err)
			}
			// The background part fails: everything is removed.
			if err := m.Close(ctx); err != nil {
				t.Fatal(err)
			}
			p, err = m.Begin(ctx, "sb-fail", 6)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := p.Wait(); err == nil {
				t.Fatal("Wait succeeded without the table")
			}
			fn := m.Lookup("sb-fail", 6)
			for _, f := range []string{fn.NetnsPath, fn.UserNS.Path} {
				if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("failed network left %s: %v", f, err)
				}
			}
			if _, err := netlink.LinkByName(fn.HostIf); err == nil {
				t.Errorf("failed network left %s", fn.HostIf)
			}
			if spares := spareLinks(t, m); len(spares) != 0 {
				t.Errorf("failed network left veths: %v", spares)
			}
			if err := m.Init(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func hasAddr(addrs []netlink.Addr, ip netip.Addr) bool {
	for _, a := range addrs {
		if a.IP.Equal(ip.AsSlice()) {
			return true
		}
	}
	return false
}
