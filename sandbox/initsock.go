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
// It runs for every connection to init, so it reads with plain system calls
// (os.File costs twice as many: the netpoller probes and its flags).
func (r *Runtime) initPid(id string) (int, error) {
	var buf [32]byte
	b, err := readSmall(filepath.Join(r.Dir(id), initPidFile), buf[:])
	if err != nil {
		return 0, fmt.Errorf("init's pid: %w", err)
	}
	n := len(b)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b[:n])))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("init's pid file holds %q", b[:n])
	}
	return pid, nil
}

// inCgroup reports whether pid is in the cgroup at path (cgroupfs path, as
// in the spec's cgroupsPath), or below it, in any hierarchy.
func inCgroup(pid int, path string) (bool, error) {
	var buf [4096]byte
	b, err := readSmall("/proc/"+strconv.Itoa(pid)+"/cgroup", buf[:])
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

// readSmall reads the file at name (not following a final symlink) into buf,
// or into a larger buffer if it does not fit, up to 64 KiB.
func readSmall(name string, buf []byte) ([]byte, error) {
	fd, err := unix.Open(name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: name, Err: err}
	}
	defer unix.Close(fd)
	const limit = 64 << 10
	n := 0
	for {
		if n == len(buf) {
			if len(buf) >= limit {
				return nil, fmt.Errorf("read %s: larger than %d bytes", name, limit)
			}
			buf = append(buf, make([]byte, len(buf))...)
		}
		m, err := unix.Read(fd, buf[n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &os.PathError{Op: "read", Path: name, Err: err}
		}
		if m == 0 {
			return buf[:n], nil
		}
		n += m
	}
}
