package sandbox

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/procapi"
)

// The host ↔ init channel.
//
// init's socket lives in the sandbox's run dir, which the sandbox's root can
// write (it is bind-mounted at RunDir): it may rename a symlink to another
// sandbox's socket over init.sock, or listen there itself. So chalkd never
// follows that path and never trusts what answers: every connection goes
// through procapi.DialSocket (no symlinks, sockets only, connect to the
// inode that was checked) and its listener must be the sandbox's own:
//
//   - runc: the sandbox's init itself, by host pid. runc writes that pid to
//     init.pid in the sandbox's directory (host-only, so it holds after a
//     chalkd restart and for pre-started sandboxes); the pid must also be in
//     the sandbox's cgroup (a pid reused after init's death is not).
//     Another process of the sandbox, root or not, listens with its own pid.
//   - runsc: the host socket is made by gVisor's gofer (--host-uds=create:
//     the Sentry asks the gofer to bind and listen), for init and for any
//     other process of the sandbox alike, so the check is the sandbox's
//     cgroup, which holds only that sandbox's Sentry and gofer. A process in
//     the sandbox can then stand in for its own init (and so can, under
//     runc too, whatever controls init); never for another sandbox's.

// initPidFile is the host file (in the sandbox's directory) with init's pid.
const initPidFile = "init.pid"

// Client is the process API client of sandbox id. It dials init's socket
// without following links and accepts only the sandbox's own init (or, on
// gVisor, its Sentry) as the listener; see checkPeer.
func (r *Runtime) Client(id string) *procapi.Client {
	runDir := filepath.Join(r.Dir(id), "run")
	return procapi.NewClient(id, func(ctx context.Context) (net.Conn, error) {
		return procapi.DialSocket(ctx, runDir, SocketName, func(cred *unix.Ucred) error {
			return r.checkPeer(id, cred)
		})
	})
}

// checkPeer accepts the listener of sandbox id's init socket if it is the
// sandbox's init (runc) or a process of the sandbox's cgroup (runsc).
func (r *Runtime) checkPeer(id string, cred *unix.Ucred) error {
	pid := int(cred.Pid)
	if r.cfg.Runtime == RuntimeRunc {
		want, err := r.initPid(id)
		if err != nil {
			return err
		}
		if pid != want {
			return fmt.Errorf("the listener is pid %d, not the sandbox's init (pid %d)", pid, want)
		}
	}
	want := r.cgroupPath(id)
	in, err := inCgroup(pid, want)
	if err != nil {
		return fmt.Errorf("the listener (pid %d): %w", pid, err)
	}
	if !in {
		return fmt.Errorf("the listener (pid %d) is not in the sandbox's cgroup %s", pid, want)
	}
	return nil
}

// initPid reads the host pid of sandbox id's init from the file runc wrote.
func (r *Runtime) initPid(id string) (int, error) {
	f, err := os.OpenFile(filepath.Join(r.Dir(id), initPidFile), os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return 0, fmt.Errorf("init's pid: %w", err)
	}
	defer f.Close()
	b := make([]byte, 32)
	n, err := f.Read(b)
	if err != nil {
		return 0, fmt.Errorf("init's pid: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b[:n])))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("init's pid file holds %q", b[:n])
	}
	return pid, nil
}

// inCgroup reports whether pid is in the cgroup at path (cgroupfs path, as
// in the spec's cgroupsPath), or below it, in any hierarchy.
func inCgroup(pid int, path string) (bool, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return false, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		// hierarchy-ID:controller-list:cgroup-path
		f := strings.SplitN(sc.Text(), ":", 3)
		if len(f) == 3 && (f[2] == path || strings.HasPrefix(f[2], path+"/")) {
			return true, nil
		}
	}
	return false, nil
}
