package procapi

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"syscall"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

const (
	// MaxWinsize is the largest number of rows or columns of a terminal.
	MaxWinsize = 1000
	// DefaultRows and DefaultCols size a terminal whose request gives no size.
	DefaultRows, DefaultCols = 24, 80
	// DefaultTerm is TERM on a terminal whose request names none.
	DefaultTerm = "xterm-256color"
	// maxTermLen bounds the TERM name.
	maxTermLen = 64
)

// PTY asks for an exec on a pseudo-terminal allocated by init (see the
// package doc). The zero value is a 24x80 xterm-256color terminal.
type PTY struct {
	Rows uint16 `json:"rows,omitempty"` // 0 => DefaultRows
	Cols uint16 `json:"cols,omitempty"` // 0 => DefaultCols
	// Term is TERM in the process's environment (it overrides the
	// request's Env); "" => DefaultTerm. A plain token (ValidTerm).
	Term string `json:"term,omitempty"`
}

// ValidTerm reports whether term is a plain terminal name: 1 to 64 letters,
// digits and ".+-_".
func ValidTerm(term string) bool {
	if term == "" || len(term) > maxTermLen {
		return false
	}
	for _, r := range term {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '+', r == '-', r == '_':
		default:
			return false
		}
	}
	return true
}

// CheckWinsize checks a terminal size: both in 1..MaxWinsize.
func CheckWinsize(rows, cols int) error {
	if rows < 1 || rows > MaxWinsize || cols < 1 || cols > MaxWinsize {
		return fmt.Errorf("terminal size %dx%d: rows and columns must be 1..%d: %w", rows, cols, MaxWinsize, errdefs.ErrInvalidArgument)
	}
	return nil
}

// withDefaults checks p and fills in its defaults.
func (p PTY) withDefaults() (PTY, error) {
	if p.Rows == 0 {
		p.Rows = DefaultRows
	}
	if p.Cols == 0 {
		p.Cols = DefaultCols
	}
	if p.Term == "" {
		p.Term = DefaultTerm
	}
	if err := CheckWinsize(int(p.Rows), int(p.Cols)); err != nil {
		return p, err
	}
	if !ValidTerm(p.Term) {
		return p, fmt.Errorf("terminal type %.80q: want a plain name (letters, digits, .+-_; at most %d bytes): %w", p.Term, maxTermLen, errdefs.ErrInvalidArgument)
	}
	return p, nil
}

// resizePayload encodes a resize frame.
func resizePayload(rows, cols uint16) []byte {
	var b [4]byte
	binary.BigEndian.PutUint16(b[0:], rows)
	binary.BigEndian.PutUint16(b[2:], cols)
	return b[:]
}

// setWinsize sets the terminal's size; the kernel sends SIGWINCH to its
// foreground process group.
func setWinsize(master *os.File, rows, cols uint16) error {
	rc, err := master.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		ierr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
	}); err != nil {
		return err
	}
	return ierr
}

// openPTY allocates a terminal: its master, pollable (so output reads take
// deadlines, see execution.run), and its tty.
func openPTY() (master, tty *os.File, err error) {
	m, tty, err := pty.Open()
	if err != nil {
		return nil, nil, err
	}
	defer m.Close()
	// creack/pty's ioctls use Fd(), which leaves the file blocking and
	// outside the poller; a non-blocking copy is pollable.
	fd, err := unix.FcntlInt(m.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err == nil {
		err = unix.SetNonblock(fd, true)
		if err != nil {
			unix.Close(fd)
		}
	}
	if err != nil {
		tty.Close()
		return nil, nil, err
	}
	return os.NewFile(uintptr(fd), "/dev/ptmx"), tty, nil
}

// dupFile returns a second descriptor of f (same open file), so that the
// stdin writer can close its own without closing the reader's.
func dupFile(f *os.File, name string) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nfd int
	var derr error
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	// The master is non-blocking (Go's poller), so the copy is pollable too.
	return os.NewFile(uintptr(nfd), name), nil
}

// execPTY starts an exec on a new terminal and streams it: the process is a
// session leader whose controlling terminal is the new one (setsid,
// TIOCSCTTY), so job control and ^C/^Z/^\ work as on a console.
func (s *server) execPTY(c *conn, req *request, bin string, env []string, cred *syscall.Credential) (again bool) {
	t, err := req.PTY.withDefaults()
	if err != nil {
		c.sendErr(err)
		return false
	}
	master, tty, err := openPTY()
	if err != nil {
		c.sendErr(fmt.Errorf("allocate a terminal: %v: %w", err, errdefs.ErrFailedPrecondition))
		return false
	}
	if err := setWinsize(master, t.Rows, t.Cols); err != nil {
		master.Close()
		tty.Close()
		c.sendErr(fmt.Errorf("size the terminal: %v: %w", err, errdefs.ErrFailedPrecondition))
		return false
	}
	if cred != nil {
		// The user owns its terminal, as after a login (mesg, reopening
		// /dev/pts/N); its mode stays 0620.
		_ = tty.Chown(int(cred.Uid), int(cred.Gid))
	}
	var stdinW *os.File
	if req.Stdin {
		if stdinW, err = dupFile(master, "ptmx-stdin"); err != nil {
			master.Close()
			tty.Close()
			c.sendErr(startErr(req.Argv[0], err))
			return false
		}
	}
	pid, exited, err := s.reaper.Start(bin, req.Argv, &os.ProcAttr{
		Dir:   req.Dir,
		Env:   mergeEnv(env, []string{"TERM=" + t.Term}),
		Files: []*os.File{tty, tty, tty},
		// Its own session, led by it, with the terminal (its fd 0) as the
		// controlling terminal. Its process group is its pid too, so
		// signals reach it as for any exec.
		Sys: &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0, Credential: cred},
	})
	tty.Close() // init keeps only the master: the exec ends when no process holds the terminal
	if err != nil {
		master.Close()
		if stdinW != nil {
			stdinW.Close()
		}
		c.sendErr(startErr(req.Argv[0], err))
		return false
	}
	e := &execution{c: c, pid: pid, stopping: s.stopping, pty: master, holdStart: req.Wait, reuse: req.Reuse}
	s.log.Debug("procapi: exec on a terminal", "pid", e.pid, "argv0", req.Argv[0], "rows", t.Rows, "cols", t.Cols)
	if stdinW != nil {
		e.stdin = newStdinQueue(stdinW)
		go e.stdin.run(c)
	}
	again = e.run([]output{{master, frameStdout}}, exited)
	s.log.Debug("procapi: exec on a terminal ended", "pid", e.pid)
	return again
}

// resize handles a resize frame: a malformed or out-of-range size is
// ignored, as is a resize of an exec without a terminal.
func (e *execution) resize(b []byte) {
	if e.pty == nil || len(b) != 4 {
		return
	}
	rows, cols := binary.BigEndian.Uint16(b[0:]), binary.BigEndian.Uint16(b[2:])
	if CheckWinsize(int(rows), int(cols)) != nil {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.exited {
		_ = setWinsize(e.pty, rows, cols)
	}
}

// killSession kills every process of the session sid (an exec on a
// terminal: its shell's jobs run in process groups of their own). A killed
// process cannot fork any more, so a second pass catches the children forked
// while the first one ran.
func killSession(sid int) {
	if sid <= 1 {
		return
	}
	for pass := 0; pass < 2; pass++ {
		ents, err := os.ReadDir("/proc")
		if err != nil {
			return
		}
		for _, d := range ents {
			pid, err := strconv.Atoi(d.Name())
			if err != nil || pid <= 1 {
				continue
			}
			if s, err := unix.Getsid(pid); err == nil && s == sid {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
		}
	}
}
