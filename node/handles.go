package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/procapi"
)

// The handles the node gives the control plane on a sandbox are interfaces,
// so that the seam (api.Node) can be faked in tests and carried over a
// network later: a process, file access, and the console log.

// Process is a command running in a sandbox (a procapi.Process on its init).
type Process interface {
	// Pid is the process id inside the sandbox.
	Pid() int
	// Stdin is the process's stdin, nil if it was started without one.
	Stdin() io.WriteCloser
	// Signal sends sig to the process group; errdefs.ErrFailedPrecondition
	// once the process has ended.
	Signal(sig syscall.Signal) error
	// Wait returns how the process ended once all its output is delivered.
	Wait() (procapi.ExitStatus, error)
	// PTY reports whether the process runs on a terminal (ExecRequest.PTY).
	PTY() bool
	// Resize sets the terminal's window size (errdefs.ErrFailedPrecondition
	// without a terminal or once the process has ended).
	Resize(rows, cols int) error
}

// Files is file access inside a sandbox (its init's procapi.Client).
type Files interface {
	ReadFile(ctx context.Context, path string) (io.ReadCloser, error)
	WriteFile(ctx context.Context, path string, mode fs.FileMode, r io.Reader) error
	ListDir(ctx context.Context, path string) ([]procapi.FileInfo, error)
	Remove(ctx context.Context, path string, recursive bool) error
}

var (
	_ Process       = (*procapi.Process)(nil)
	_ Files         = (*procapi.Client)(nil)
	_ io.ReadCloser = (*consoleLog)(nil)
)

// consoleLog reads a sandbox's console log: its previous part (init rotates
// the log into path.1 at its cap), then the current one. At the end of what
// is written Read returns io.EOF; a later Read returns what was written
// since, from the log's new start if init emptied it meanwhile (follow).
type consoleLog struct {
	prev *os.File // nil once read (or if there is none)
	cur  *os.File
}

func openConsoleLog(id, path string) (*consoleLog, error) {
	cur, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("logs of sandbox %q: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	prev, err := os.Open(path + ".1")
	if err != nil {
		prev = nil
	}
	return &consoleLog{prev: prev, cur: cur}, nil
}

func (l *consoleLog) Read(b []byte) (int, error) {
	if l.prev != nil {
		n, err := l.prev.Read(b)
		if err != nil {
			l.prev.Close()
			l.prev = nil
		}
		if n > 0 {
			return n, nil
		}
	}
	n, err := l.cur.Read(b)
	if n == 0 && err == io.EOF {
		// Rotated (emptied) since we read: follow from its new start.
		if off, _ := l.cur.Seek(0, io.SeekCurrent); off > 0 {
			if st, serr := l.cur.Stat(); serr == nil && st.Size() < off {
				_, _ = l.cur.Seek(0, io.SeekStart)
				return l.cur.Read(b)
			}
		}
	}
	return n, err
}

func (l *consoleLog) Close() error {
	if l.prev != nil {
		l.prev.Close()
	}
	return l.cur.Close()
}

// ErrLost is the error a node's Wait (or any call for a sandbox on it)
// returns when the node stopped answering: the control plane cannot tell
// whether the sandbox still runs, and reports it lost (end_reason "lost").
var ErrLost = errors.New("node lost")
