package procapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// ServerOptions configures Serve.
type ServerOptions struct {
	Logger *slog.Logger
	// Reaper starts and reaps processes; nil creates one.
	Reaper *Reaper
	// DefaultUser ("uid[:gid]") runs processes whose request names no user.
	DefaultUser string
}

// Serve serves the process API on l until ctx is done.
func Serve(ctx context.Context, l net.Listener, opts ServerOptions) error {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Reaper == nil {
		opts.Reaper = NewReaper()
		defer opts.Reaper.Close()
	}
	s := &server{log: opts.Logger, reaper: opts.Reaper, defaultUser: opts.DefaultUser}
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		go s.handle(c)
	}
}

type server struct {
	log         *slog.Logger
	reaper      *Reaper
	defaultUser string
}

// conn serialises frame writes from several goroutines.
type conn struct {
	net.Conn
	wmu sync.Mutex
}

func (c *conn) send(typ byte, payload []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return writeFrame(c.Conn, typ, payload)
}

func (c *conn) sendJSON(typ byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.send(typ, b)
}

func (c *conn) sendErr(err error) { _ = c.sendJSON(frameError, wireError(err)) }

func (s *server) handle(nc net.Conn) {
	c := &conn{Conn: nc}
	defer c.Close()
	typ, b, err := readFrame(c, nil)
	if err != nil {
		return
	}
	if typ != frameRequest {
		c.sendErr(fmt.Errorf("first frame must be a request: %w", errdefs.ErrInvalidArgument))
		return
	}
	var req request
	if err := json.Unmarshal(b, &req); err != nil {
		c.sendErr(fmt.Errorf("request: %v: %w", err, errdefs.ErrInvalidArgument))
		return
	}
	switch req.Op {
	case "ping":
		_ = c.sendJSON(frameResult, struct{}{})
	case "exec":
		s.exec(c, &req)
	case "read":
		s.readFile(c, &req)
	case "write":
		s.writeFile(c, &req)
	case "stat":
		s.stat(c, &req)
	case "list":
		s.list(c, &req)
	case "remove":
		s.remove(c, &req)
	default:
		c.sendErr(fmt.Errorf("unknown operation %q: %w", req.Op, errdefs.ErrInvalidArgument))
	}
}

// mergeEnv overlays add on base (later wins).
func mergeEnv(base, add []string) []string {
	idx := map[string]int{}
	out := make([]string, 0, len(base)+len(add))
	for _, kv := range append(append([]string(nil), base...), add...) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	return out
}

// lookPath resolves file through PATH from env.
func lookPath(file string, env []string) (string, error) {
	if strings.Contains(file, "/") {
		if st, err := os.Stat(file); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			return "", fmt.Errorf("executable %q not found: %w", file, errdefs.ErrNotFound)
		}
		return file, nil
	}
	path := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, file)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("executable %q not found in PATH: %w", file, errdefs.ErrNotFound)
}

// ParseUser parses "uid[:gid]" ("" = no change).
func ParseUser(u string) (*syscall.Credential, error) {
	if u == "" {
		return nil, nil
	}
	us, gs, hasG := strings.Cut(u, ":")
	uid, err := strconv.ParseUint(us, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("user %q: want uid[:gid]: %w", u, errdefs.ErrInvalidArgument)
	}
	gid := uid
	if hasG {
		if gid, err = strconv.ParseUint(gs, 10, 32); err != nil {
			return nil, fmt.Errorf("user %q: want uid[:gid]: %w", u, errdefs.ErrInvalidArgument)
		}
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}, nil
}

func (s *server) exec(c *conn, req *request) {
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		c.sendErr(fmt.Errorf("argv: a command is required: %w", errdefs.ErrInvalidArgument))
		return
	}
	env := mergeEnv(os.Environ(), req.Env)
	bin, err := lookPath(req.Argv[0], env)
	if err != nil {
		c.sendErr(err)
		return
	}
	user := req.User
	if user == "" {
		user = s.defaultUser
	}
	cred, err := ParseUser(user)
	if err != nil {
		c.sendErr(err)
		return
	}
	if req.Dir != "" {
		if st, err := os.Stat(req.Dir); err != nil || !st.IsDir() {
			c.sendErr(fmt.Errorf("workdir %q: not a directory: %w", req.Dir, errdefs.ErrInvalidArgument))
			return
		}
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		c.sendErr(err)
		return
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		c.sendErr(err)
		return
	}
	var stdinW *os.File
	var stdinR *os.File
	if req.Stdin {
		if stdinR, stdinW, err = os.Pipe(); err != nil {
			c.sendErr(err)
			return
		}
	} else if stdinR, err = os.Open(os.DevNull); err != nil {
		c.sendErr(err)
		return
	}
	attr := &os.ProcAttr{
		Dir:   req.Dir,
		Env:   env,
		Files: []*os.File{stdinR, outW, errW},
		Sys:   &syscall.SysProcAttr{Setpgid: true, Credential: cred},
	}
	p, exited, err := s.reaper.Start(bin, req.Argv, attr)
	stdinR.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		if stdinW != nil {
			stdinW.Close()
		}
		c.sendErr(fmt.Errorf("start %q: %v: %w", req.Argv[0], err, errdefs.ErrFailedPrecondition))
		return
	}
	pid := p.Pid
	defer p.Release()
	if err := c.sendJSON(frameStarted, startedMsg{Pid: pid}); err != nil {
		_ = unix.Kill(-pid, unix.SIGKILL)
	}
	// Output pumps: one per stream, each forwarding chunks as they arrive.
	var pumps sync.WaitGroup
	pump := func(r *os.File, typ byte) {
		defer pumps.Done()
		defer r.Close()
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Read(buf)
			if n > 0 {
				if c.send(typ, buf[:n]) != nil {
					_, _ = io.Copy(io.Discard, r) // the client is gone: drain so the process is not blocked
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	pumps.Add(2)
	go pump(outR, frameStdout)
	go pump(errR, frameStderr)
	// Client frames: stdin, EOF, signals. A closed connection kills the process group.
	clientGone := make(chan struct{})
	go func() {
		defer close(clientGone)
		buf := make([]byte, MaxChunk)
		for {
			typ, b, err := readFrame(c, buf)
			if err != nil {
				if stdinW != nil {
					stdinW.Close()
				}
				return
			}
			switch typ {
			case frameStdin:
				if stdinW != nil {
					_, _ = stdinW.Write(b)
				}
			case frameStdinEOF:
				if stdinW != nil {
					stdinW.Close()
				}
			case frameSignal:
				// To the process group, as a terminal would: children go too.
				if len(b) == 1 {
					_ = unix.Kill(-pid, unix.Signal(b[0]))
				}
			}
		}
	}()
	var ws unix.WaitStatus
	select {
	case ws = <-exited:
	case <-clientGone:
		_ = unix.Kill(-pid, unix.SIGKILL)
		ws = <-exited
	}
	// Wait for the output of the process; background children that keep the
	// pipes open get a short grace period, then their output is cut off.
	done := make(chan struct{})
	go func() { pumps.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(250 * time.Millisecond):
		outR.SetReadDeadline(time.Now())
		errR.SetReadDeadline(time.Now())
		<-done
	}
	msg := exitMsg{Code: ws.ExitStatus()}
	if ws.Signaled() {
		msg.Code = 128 + int(ws.Signal())
		msg.Signal = unix.SignalName(ws.Signal())
	}
	_ = c.sendJSON(frameExit, msg)
	if stdinW != nil {
		stdinW.Close()
	}
}

func fileErr(op, path string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s %s: no such file or directory: %w", op, path, errdefs.ErrNotFound)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("%s %s: %w", op, path, errdefs.ErrPermissionDenied)
	case errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ENOTDIR), errors.Is(err, syscall.ENOTEMPTY):
		return fmt.Errorf("%s %s: %v: %w", op, path, err, errdefs.ErrFailedPrecondition)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return fmt.Errorf("%s %s: %v: %w", op, path, err, errdefs.ErrResourceExhausted)
	}
	return fmt.Errorf("%s %s: %w", op, path, err)
}

func checkPath(p string) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("path %q: must be absolute: %w", p, errdefs.ErrInvalidArgument)
	}
	return nil
}

func (s *server) readFile(c *conn, req *request) {
	if err := checkPath(req.Path); err != nil {
		c.sendErr(err)
		return
	}
	f, err := os.Open(req.Path)
	if err != nil {
		c.sendErr(fileErr("read", req.Path, err))
		return
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.IsDir() {
		c.sendErr(fmt.Errorf("read %s: is a directory: %w", req.Path, errdefs.ErrFailedPrecondition))
		return
	}
	buf := make([]byte, MaxChunk)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			if c.send(frameFile, buf[:n]) != nil {
				return
			}
		}
		if err == io.EOF {
			_ = c.send(frameFileEnd, nil)
			return
		}
		if err != nil {
			c.sendErr(fileErr("read", req.Path, err))
			return
		}
	}
}

func (s *server) writeFile(c *conn, req *request) {
	if err := checkPath(req.Path); err != nil {
		c.sendErr(err)
		return
	}
	mode := fs.FileMode(req.Mode) & fs.ModePerm
	if mode == 0 {
		mode = 0o644
	}
	dir := filepath.Dir(req.Path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		c.sendErr(fileErr("mkdir", dir, err))
		return
	}
	tmp, err := os.CreateTemp(dir, ".chalk-write-*")
	if err != nil {
		c.sendErr(fileErr("write", req.Path, err))
		return
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	buf := make([]byte, MaxChunk)
	for {
		typ, b, err := readFrame(c, buf)
		if err != nil {
			return // client gone: discard the partial file
		}
		if typ == frameDataEnd {
			break
		}
		if typ != frameData {
			c.sendErr(fmt.Errorf("write %s: unexpected frame %q: %w", req.Path, typ, errdefs.ErrInvalidArgument))
			return
		}
		if _, err := tmp.Write(b); err != nil {
			c.sendErr(fileErr("write", req.Path, err))
			return
		}
	}
	if err := tmp.Chmod(mode); err != nil {
		c.sendErr(fileErr("chmod", req.Path, err))
		return
	}
	if err := tmp.Close(); err != nil {
		c.sendErr(fileErr("write", req.Path, err))
		return
	}
	if err := os.Rename(tmp.Name(), req.Path); err != nil {
		c.sendErr(fileErr("write", req.Path, err))
		return
	}
	ok = true
	_ = c.sendJSON(frameResult, struct{}{})
}

func infoOf(name string, st fs.FileInfo) FileInfo {
	return FileInfo{Name: name, Size: st.Size(), Mode: st.Mode(), ModTime: st.ModTime(), IsDir: st.IsDir()}
}

func (s *server) stat(c *conn, req *request) {
	if err := checkPath(req.Path); err != nil {
		c.sendErr(err)
		return
	}
	st, err := os.Stat(req.Path)
	if err != nil {
		c.sendErr(fileErr("stat", req.Path, err))
		return
	}
	_ = c.sendJSON(frameResult, infoOf(filepath.Base(req.Path), st))
}

func (s *server) list(c *conn, req *request) {
	if err := checkPath(req.Path); err != nil {
		c.sendErr(err)
		return
	}
	ents, err := os.ReadDir(req.Path)
	if err != nil {
		c.sendErr(fileErr("list", req.Path, err))
		return
	}
	out := make([]FileInfo, 0, len(ents))
	for _, e := range ents {
		st, err := e.Info()
		if err != nil {
			continue
		}
		out = append(out, infoOf(e.Name(), st))
	}
	_ = c.sendJSON(frameResult, out)
}

func (s *server) remove(c *conn, req *request) {
	if err := checkPath(req.Path); err != nil {
		c.sendErr(err)
		return
	}
	if filepath.Clean(req.Path) == "/" {
		c.sendErr(fmt.Errorf("remove /: %w", errdefs.ErrInvalidArgument))
		return
	}
	if _, err := os.Lstat(req.Path); err != nil {
		c.sendErr(fileErr("remove", req.Path, err))
		return
	}
	var err error
	if req.Recursive {
		err = os.RemoveAll(req.Path)
	} else {
		err = os.Remove(req.Path)
	}
	if err != nil {
		c.sendErr(fileErr("remove", req.Path, err))
		return
	}
	_ = c.sendJSON(frameResult, struct{}{})
}
