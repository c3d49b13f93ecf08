package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/term"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

// errNotATTY is -t with -i on a stdin that is no terminal (a pipe, a file):
// raw mode and window sizes need one.
var errNotATTY = errors.New("the input device is not a TTY: an interactive terminal (exec -it, shell) needs a terminal on stdin; drop -t to pipe input")

// isTerminal reports whether r is a terminal.
func isTerminal(r any) bool {
	f, ok := r.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// shellScript starts bash if the image has it, else sh.
const shellScript = `if command -v bash >/dev/null 2>&1; then exec bash; fi; exec sh`

// terminalSize is the size of the first of the files that is a terminal.
func terminalSize(files ...any) (rows, cols int, ok bool) {
	for _, r := range files {
		if !isTerminal(r) {
			continue
		}
		f := r.(*os.File)
		if w, h, err := term.GetSize(int(f.Fd())); err == nil && w > 0 && h > 0 {
			return min(h, 1000), min(w, 1000), true
		}
	}
	return 0, 0, false
}

// termName is TERM for the sandbox's terminal: ours when it is a plain
// name, else the server's default.
func termName() string {
	t := os.Getenv("TERM")
	if t == "" || len(t) > 64 {
		return ""
	}
	for _, r := range t {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '+' || r == '-' || r == '_') {
			return ""
		}
	}
	return t
}

// runTerminal runs argv in sb on a terminal allocated in the sandbox, like
// `docker exec -t`: with interactive, this terminal is put in raw mode (so
// ^C, ^D, ^Z reach the program as bytes and the sandbox's terminal makes
// them signals) and restored on every way out; the window size is sent at
// the start and after every SIGWINCH. It returns the program's exit status
// as an *ExitError.
func runTerminal(ctx context.Context, e *env, sb *chalkcompute.Sandbox, argv []string, interactive bool, opts []chalkcompute.ExecOption) error {
	in, _ := e.in.(*os.File)
	if interactive && !isTerminal(e.in) {
		return errNotATTY
	}
	rows, cols, _ := terminalSize(e.in, e.out)
	opts = append(opts, chalkcompute.ExecPTY(rows, cols), chalkcompute.ExecTerm(termName()), chalkcompute.Stdout(e.out))
	if interactive {
		opts = append(opts, chalkcompute.ExecStdin())
		restore, err := rawMode(in)
		if err != nil {
			return err
		}
		defer restore()
	}
	// Signals that would end the CLI end the exec instead (it is
	// cancelled, which kills it), so the deferred restore always runs.
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGQUIT)
	defer stop()
	winch := make(chan os.Signal, 1)
	signal.Notify(winch, syscall.SIGWINCH)
	defer signal.Stop(winch)

	p, err := sb.Start(ctx, argv, opts...)
	if err != nil {
		return err
	}
	go followResizes(ctx, p, winch, rows, cols, e.in, e.out)
	if interactive {
		go func() { _, _ = io.Copy(p.Stdin(), in) }()
	}
	st, err := p.Wait()
	if err != nil {
		return err
	}
	if st.TimedOut {
		fmt.Fprint(e.errOut, "chalk: command timed out\r\n")
	}
	if st.Code != 0 {
		return &ExitError{Code: st.Code}
	}
	return nil
}

// rawMode puts f in raw mode and returns what restores it.
func rawMode(f *os.File) (restore func(), err error) {
	fd := int(f.Fd())
	old, err := term.MakeRaw(fd)
	if err != nil {
		return nil, fmt.Errorf("terminal raw mode: %w", err)
	}
	return func() { _ = term.Restore(fd, old) }, nil
}

// followResizes sends the window size whenever it changes: once at once
// (it may have changed while the exec started), then on every SIGWINCH.
func followResizes(ctx context.Context, p *chalkcompute.Process, winch <-chan os.Signal, rows, cols int, files ...any) {
	for {
		if r, c, ok := terminalSize(files...); ok && (r != rows || c != cols) {
			if p.Resize(ctx, r, c) == nil {
				rows, cols = r, c
			}
		}
		select {
		case <-winch:
		case <-ctx.Done():
			return
		}
	}
}
