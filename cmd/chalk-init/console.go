package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// console is the sandbox's console log, capped. The host opens the log
// (read-write, append) as init's stdout and stderr and its previous part
// (LOG.1, read-write) as another fd; with --log-max, the entrypoint's
// output reaches the log only through a pipe init reads, and when a write
// would take the log past the cap, init moves the log's content to the
// previous part and empties the log. The host then holds at most twice
// the cap per sandbox, whatever the sandbox writes and whether or not
// chalkd is running (sandboxes outlive it); the log API reads the previous
// part, then the log. The sandbox cannot reach these fds: init is not
// dumpable (no /proc/1/fd), and no process it starts inherits them.
type console struct {
	mu   sync.Mutex
	log  *os.File // stdout: the log (O_RDWR|O_APPEND)
	prev *os.File // the previous part, or nil: the log is then just emptied
	max  int64
	size int64
}

// newConsole caps log (init's stdout) at max bytes, rotating into prev.
func newConsole(log, prev *os.File, max int64) (*console, error) {
	st, err := log.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("console log: not a regular file (%v)", st.Mode())
	}
	return &console{log: log, prev: prev, max: max, size: st.Size()}, nil
}

var _ io.Writer = (*console)(nil)

// Write writes p to the log, rotating first if p would not fit. Of a p
// larger than the cap only its last max bytes are kept.
func (c *console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := len(p)
	if int64(len(p)) > c.max {
		p = p[int64(len(p))-c.max:]
	}
	if c.size+int64(len(p)) > c.max {
		if err := c.rotate(); err != nil {
			return 0, err
		}
	}
	w, err := c.log.Write(p)
	c.size += int64(w)
	if err != nil {
		return 0, err
	}
	return n, nil
}

// rotate moves the log's content to the previous part and empties the log.
func (c *console) rotate() error {
	if c.prev != nil {
		if err := c.prev.Truncate(0); err != nil {
			return err
		}
		if _, err := io.Copy(io.NewOffsetWriter(c.prev, 0), io.NewSectionReader(c.log, 0, c.size)); err != nil {
			return err
		}
	}
	if err := c.log.Truncate(0); err != nil {
		return err
	}
	c.size = 0
	return nil
}

// pump copies what the entrypoint writes to r into the console until r's
// write ends are all closed. done is closed then.
func (c *console) pump(r *os.File, done chan<- struct{}) {
	defer close(done)
	defer r.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			_, _ = c.Write(buf[:n])
		}
		if err != nil {
			return
		}
	}
}

// drainWait is how long init waits, after the entrypoint ends, for the rest
// of its output: a background process it left may hold the pipe open.
const drainWait = 500 * time.Millisecond

// drained waits for the pump to finish, at most drainWait.
func drained(done <-chan struct{}) {
	if done == nil {
		return
	}
	t := time.NewTimer(drainWait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}
