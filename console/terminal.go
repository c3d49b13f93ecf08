package console

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"github.com/coder/websocket"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
)

// The terminal protocol over the WebSocket (GET /console/terminal?sandbox=ID):
//
//   - the browser's first message is a text frame {"csrf": token, "rows": n,
//     "cols": n}; nothing runs before it carries the session's CSRF token;
//   - then binary frames are keystrokes (WriteStdin) and text frames
//     {"type": "resize", "rows": n, "cols": n} (ResizeExec);
//   - chalkd sends the terminal's output as binary frames and, as text
//     frames, {"type": "mode", "pty": bool} once the shell runs (pty false:
//     the node has no terminals, the shell reads a pipe and the page edits
//     lines itself), {"type": "exit", "code": n} and {"type": "error",
//     "message": s}.
const (
	maxTerminalFrame = 64 << 10
)

// control is a text frame of the terminal protocol.
type control struct {
	Type    string `json:"type,omitempty"`
	CSRF    string `json:"csrf,omitempty"`
	Rows    uint32 `json:"rows,omitempty"`
	Cols    uint32 `json:"cols,omitempty"`
	PTY     *bool  `json:"pty,omitempty"`
	Code    *int32 `json:"code,omitempty"`
	Message string `json:"message,omitempty"`
}

// shell is what the terminal runs in the sandbox.
var shell = []string{"/bin/sh", "-i"}

// terminal authenticates the session from the upgrade request's cookie and
// Origin (before the upgrade; the WebSocket is opened only same-origin), and
// the CSRF token from the first message, then relays a shell.
func (h *Handler) terminal(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Origin") == "" {
		h.fail(w, r, fmt.Errorf("a terminal needs a browser's Origin header: %w", errdefs.ErrPermissionDenied))
		return
	}
	cs, err := h.api.Session(r, false)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	id := r.URL.Query().Get("sandbox")
	if id == "" {
		h.fail(w, r, fmt.Errorf("terminal: ?sandbox= is required: %w", errdefs.ErrInvalidArgument))
		return
	}
	conn, err := websocket.Accept(w, r, nil) // also checks Origin against Host
	if err != nil {
		return
	}
	defer conn.CloseNow()
	conn.SetReadLimit(maxTerminalFrame)
	ctx, cancel := context.WithCancel(api.WithPrincipal(r.Context(), cs.Principal))
	defer cancel()
	code, reason := h.relay(ctx, conn, cs, id)
	_ = conn.Close(code, reason)
}

// relay runs the shell and copies between it and the WebSocket until
// either ends; it returns the close status.
func (h *Handler) relay(ctx context.Context, conn *websocket.Conn, cs *api.ConsoleSession, sandboxID string) (websocket.StatusCode, string) {
	first, err := readControl(ctx, conn)
	if err != nil {
		return websocket.StatusPolicyViolation, "expected the terminal's first message"
	}
	if !api.CheckCSRF(cs.CSRF, first.CSRF) {
		return websocket.StatusPolicyViolation, "missing or wrong CSRF token"
	}
	client := computev1connect.NewSandboxServiceClient(&http.Client{Transport: h.api.LocalTransport()}, "http://chalkd.local")
	rows, cols := clampSize(first.Rows, 24), clampSize(first.Cols, 80)
	stream, err := client.Exec(ctx, connect.NewRequest(&v1.ExecRequest{
		SandboxId: sandboxID, Argv: shell, Stdin: true, Pty: true, Rows: rows, Cols: cols, Term: "xterm-256color",
	}))
	if err != nil {
		sendControl(ctx, conn, control{Type: "error", Message: err.Error()})
		return websocket.StatusNormalClosure, ""
	}
	defer stream.Close()
	if !stream.Receive() {
		sendControl(ctx, conn, control{Type: "error", Message: fmt.Sprintf("exec: %v", stream.Err())})
		return websocket.StatusNormalClosure, ""
	}
	execID := stream.Msg().GetStarted().GetExecId()
	// A node without terminals (before PTY support) answers ResizeExec
	// unimplemented: the shell then reads a pipe, and the page edits lines.
	_, rerr := client.ResizeExec(ctx, connect.NewRequest(&v1.ResizeExecRequest{SandboxId: sandboxID, ExecId: execID, Rows: rows, Cols: cols}))
	pty := connect.CodeOf(rerr) != connect.CodeUnimplemented
	sendControl(ctx, conn, control{Type: "mode", PTY: &pty})

	ended := make(chan struct{}) // the shell ended: nothing to hang up
	defer close(ended)
	go h.input(ctx, conn, client, sandboxID, execID, pty, ended)
	for stream.Receive() {
		ev := stream.Msg()
		var data []byte
		switch e := ev.Event.(type) {
		case *v1.ExecEvent_Stdout:
			data = e.Stdout
		case *v1.ExecEvent_Stderr:
			data = e.Stderr
		case *v1.ExecEvent_Exited:
			code := e.Exited.ExitCode
			sendControl(ctx, conn, control{Type: "exit", Code: &code})
			return websocket.StatusNormalClosure, ""
		}
		if len(data) > 0 {
			if err := conn.Write(ctx, websocket.MessageBinary, data); err != nil {
				return websocket.StatusGoingAway, ""
			}
		}
	}
	if err := stream.Err(); err != nil && ctx.Err() == nil {
		sendControl(ctx, conn, control{Type: "error", Message: err.Error()})
	}
	return websocket.StatusNormalClosure, ""
}

// input relays keystrokes and resizes from the browser until it goes away,
// then hangs the shell up unless it has ended.
func (h *Handler) input(ctx context.Context, conn *websocket.Conn, client computev1connect.SandboxServiceClient, sandboxID, execID string, pty bool, ended <-chan struct{}) {
	defer func() {
		select {
		case <-ended:
			return
		default:
		}
		// The browser went away: close the shell's input and hang it up
		// (a fresh context: ctx may be done).
		c, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_, _ = client.WriteStdin(c, connect.NewRequest(&v1.WriteStdinRequest{SandboxId: sandboxID, ExecId: execID, Close: true}))
		_, _ = client.SignalExec(c, connect.NewRequest(&v1.SignalExecRequest{SandboxId: sandboxID, ExecId: execID, Signal: "HUP"}))
	}()
	for {
		typ, data, err := conn.Read(ctx)
		if err != nil {
			return
		}
		if typ == websocket.MessageBinary {
			if _, err := client.WriteStdin(ctx, connect.NewRequest(&v1.WriteStdinRequest{SandboxId: sandboxID, ExecId: execID, Data: data})); err != nil {
				h.log.Debug("console terminal stdin", "sandbox", sandboxID, "err", err)
				return
			}
			continue
		}
		var c control
		if json.Unmarshal(data, &c) != nil || c.Type != "resize" || !pty {
			continue
		}
		_, err = client.ResizeExec(ctx, connect.NewRequest(&v1.ResizeExecRequest{
			SandboxId: sandboxID, ExecId: execID, Rows: clampSize(c.Rows, 24), Cols: clampSize(c.Cols, 80),
		}))
		if err != nil && !errors.Is(err, context.Canceled) {
			h.log.Debug("console terminal resize", "sandbox", sandboxID, "err", err)
		}
	}
}

// clampSize keeps a window dimension within 1..1000 (def when unset).
func clampSize(n, def uint32) uint32 {
	switch {
	case n == 0:
		return def
	case n > 1000:
		return 1000
	}
	return n
}

func readControl(ctx context.Context, conn *websocket.Conn) (control, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	typ, data, err := conn.Read(ctx)
	if err != nil {
		return control{}, err
	}
	var c control
	if typ != websocket.MessageText {
		return c, errors.New("not a text frame")
	}
	return c, json.Unmarshal(data, &c)
}

func sendControl(ctx context.Context, conn *websocket.Conn, c control) {
	b, _ := json.Marshal(c)
	_ = conn.Write(ctx, websocket.MessageText, b)
}
