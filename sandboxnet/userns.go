package sandboxnet

import (
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// User namespaces.
//
// With Config.UserNS, every sandbox gets a user namespace of its own that maps
// its ids 0..IDsPerSandbox-1 to a host range no other live sandbox has:
// UIDBase + slot*IDsPerSandbox (the slot is unique among live sandboxes and
// persisted, so the range is too, and a restarted daemon recomputes it).
// Root in a sandbox is then an unprivileged host uid: were it to escape its
// other confinement it could touch neither the node's files nor another
// sandbox's.
//
// The sandbox's network namespace must be owned by that user namespace:
// the kernel lets a process mount sysfs only for a network namespace owned
// by a user namespace in which it has CAP_SYS_ADMIN, and runc mounts sysfs
// from inside the sandbox's user namespace. So the two are made together,
// ahead of time, in the spare pool: a holder process (unshare --user --net
// cat, reading a pipe we hold) makes them with no id mapping yet. The slot, and so the range, is known only at Setup, which
// writes the holder's uid_map and gid_map, bind-mounts its user namespace
// at UserNSDir/<id> (runc joins it by path) and lets the holder exit. The
// node configures the namespace from outside as before: root of the initial
// user namespace has every capability over the namespaces of its
// descendants. The sandbox's root does not gain CAP_NET_ADMIN over its own
// network namespace: its capability set never holds it.

// IDsPerSandbox is how many uids (and gids) each sandbox's user namespace maps.
const IDsPerSandbox = 65536

// DefaultUIDBase is the default Config.UIDBase: 1Mi, above the ranges
// distributions hand out in /etc/subuid by default (100000 + 65536·n for the
// first users).
const DefaultUIDBase = 1 << 20

// UserNS is a sandbox's user namespace.
type UserNS struct {
	Path   string // bind-mounted namespace file, for runc
	HostID uint32 // the host uid and gid of the sandbox's root
	Size   uint32 // ids mapped, from 0
}

// UserNSDir is where the user namespace files of sandboxes are bind-mounted:
// next to NetnsDir.
func (m *Manager) UserNSDir() string { return filepath.Join(filepath.Dir(m.cfg.NetnsDir), "userns") }

// userNS returns the user namespace of (id, slot), nil without Config.UserNS.
func (m *Manager) userNS(id string, slot int) *UserNS {
	if !m.cfg.UserNS {
		return nil
	}
	return &UserNS{
		Path:   filepath.Join(m.UserNSDir(), id),
		HostID: m.cfg.UIDBase + uint32(slot)*IDsPerSandbox,
		Size:   IDsPerSandbox,
	}
}

// checkUIDRange makes sure every slot's range is a valid host range.
func checkUIDRange(base uint32, maxSlot int) error {
	top := uint64(base) + uint64(maxSlot+1)*IDsPerSandbox // one past the last id
	if base == 0 || top > 1<<32-1 {
		return fmt.Errorf("user namespaces: uid base %d with %d slots of %d ids ends at %d, past the last valid uid %d (use a smaller subnet or base): %w",
			base, maxSlot, IDsPerSandbox, top, uint64(1<<32-2), errdefs.ErrInvalidArgument)
	}
	return nil
}

// holder is a process alone in a new user namespace (not mapped yet) that
// owns a new network namespace: unshare(1) --user --net running cat, which
// echoes its stdin. It exits when its stdin is closed, which happens too
// when this process dies (then both namespaces vanish with it).
//
// Why not clone(CLONE_NEWUSER|CLONE_NEWNET) from chalkd itself: Go cannot
// use vfork for a child in a new user namespace, so it would fork all of
// chalkd (measured: 6-8 ms each, plus copy-on-write faults in chalkd
// afterwards that slowed sandbox creation by a fifth on 2 cores). unshare(1)
// is started with vfork and makes the namespaces itself.
type holder struct {
	cmd   *exec.Cmd
	stdin io.Closer
}

// holderArgv returns the holder's command: a static busybox's unshare and
// cat applets when there is one that makes a holder (one small static
// program, exec'd twice: no dynamic loader, ~0.65 ms less CPU per holder
// than util-linux's unshare and coreutils' cat, which load ~6 shared
// libraries between them; BenchmarkHolder), else util-linux's unshare and coreutils' cat.
// The busybox candidate is tried once (a holder started and released): a
// busybox built without either applet, or not static, is not used.
func holderArgv() ([]string, error) {
	if bb, err := exec.LookPath("busybox"); err == nil && isStatic(bb) {
		argv := []string{bb, "unshare", "--user", "--net", "--", bb, "cat"}
		if h, ns, err := startHolder(argv); err == nil {
			ns.Close()
			h.release()
			return argv, nil
		}
	}
	var bins []string
	for _, name := range []string{"unshare", "cat"} {
		bin, err := exec.LookPath(name)
		if err != nil {
			return nil, fmt.Errorf("user namespaces need %s(1) (util-linux, coreutils) or a static busybox to make them: %w", name, err)
		}
		bins = append(bins, bin)
	}
	return []string{bins[0], "--user", "--net", "--", bins[1]}, nil
}

// isStatic reports whether the ELF executable at path has no program
// interpreter (no dynamic loader runs before it).
func isStatic(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

// startHolder starts a holder with argv (holderArgv) and returns it with a
// handle on its network namespace, once the namespaces exist (cat has
// echoed a byte: it runs after the unshare).
func startHolder(argv []string) (*holder, netns.NsHandle, error) {
	// No Pdeathsig: it fires when the forking *thread* exits, and the pool
	// fills on a thread it then discards. cat ends on EOF, which is also
	// what it gets when this process dies.
	cmd := exec.Command(argv[0], argv[1:]...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, -1, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		stdin.Close()
		return nil, -1, err
	}
	if err := cmd.Start(); err != nil {
		stdin.Close()
		return nil, -1, fmt.Errorf("start the user namespace holder (%s): %w", cmd, err)
	}
	h := &holder{cmd: cmd, stdin: stdin}
	b := []byte{'.'}
	if _, err := stdin.Write(b); err != nil {
		h.release()
		return nil, -1, fmt.Errorf("user namespace holder: %w", err)
	}
	if _, err := io.ReadFull(stdout, b); err != nil {
		h.release()
		return nil, -1, fmt.Errorf("user namespace holder (%s) did not start: %w", cmd, err)
	}
	ns, err := netns.GetFromPath(fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid))
	if err != nil {
		h.release()
		return nil, -1, fmt.Errorf("netns of the user namespace holder: %w", err)
	}
	return h, ns, nil
}

// mapIDs writes the holder's uid and gid maps: 0..size-1 to hostID.. .
// A user namespace's maps can be written once.
func (h *holder) mapIDs(hostID, size uint32) error {
	line := []byte(fmt.Sprintf("0 %d %d\n", hostID, size))
	for _, f := range []string{"uid_map", "gid_map"} {
		p := fmt.Sprintf("/proc/%d/%s", h.cmd.Process.Pid, f)
		if err := os.WriteFile(p, line, 0); err != nil {
			return fmt.Errorf("write %s: %w", p, err)
		}
	}
	return nil
}

// bindUserNS bind-mounts the holder's user namespace at path (created, must not exist).
func (h *holder) bindUserNS(path string) error {
	if err := createNetnsFile(path); err != nil {
		return err
	}
	if err := unix.Mount(fmt.Sprintf("/proc/%d/ns/user", h.cmd.Process.Pid), path, "none", unix.MS_BIND, ""); err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("bind user namespace to %s: %w", path, err)
	}
	return nil
}

// release lets the holder exit (closing its stdin) and reaps it in the
// background: the exit takes about a millisecond, off the caller's path. It
// is idempotent.
func (h *holder) release() {
	if h == nil || h.stdin == nil {
		return
	}
	h.stdin.Close()
	h.stdin = nil
	go func(cmd *exec.Cmd) {
		if err := cmd.Wait(); err != nil {
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				_ = cmd.Process.Kill()
			}
		}
	}(h.cmd)
}

// removeUserNSFile unmounts and removes a user namespace file; missing is fine.
func removeUserNSFile(path string) error { return removeNetnsFile(path) }
