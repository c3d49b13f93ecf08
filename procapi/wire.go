// Package procapi is the process API between the host and a sandbox's init
// (cmd/chalk-init): start processes with streamed stdin/stdout/stderr, signal
// and wait for them, and read, write, stat, list and remove files. An exec
// costs one unix-socket connection and a fork/exec inside the sandbox — never
// a `runc exec`.
//
// The host side is Client; the sandbox side is Serve, run by chalk-init as
// PID 1. Processes are started and reaped through the process-wide Reaper,
// the only caller of wait4 in the process.
//
// # Wire protocol
//
// One unix stream connection per operation at a time, so concurrent
// operations need no multiplexing (execs may run one after the other on a
// connection; see below). Both directions carry frames:
//
//	+--------+----------------------+-------------------+
//	| type   | length               | payload           |
//	| 1 byte | 4 bytes, big endian  | length bytes      |
//	+--------+----------------------+-------------------+
//
// No frame is longer than MaxFrame; data frames (stdin, stdout, stderr, file
// bytes) carry at most MaxChunk bytes. JSON payloads ignore unknown fields,
// and a receiver ignores frame types it does not know, so the protocol grows
// by addition only: a host talks to inits of older builds still running in
// sandboxes that outlived a chalkd upgrade. Ping reports ProtocolVersion.
//
// The client opens every connection with a request frame, 'Q' {"op": ...}.
// The server then answers, per op:
//
//	ping            'K' {"version"}
//	activate        'K' {} once init has taken the sandbox's settings and
//	                started its entrypoint (pre-started sandboxes; see
//	                ServerOptions.Activate)
//	stat            'K' FileInfo
//	remove          'K' {}
//	list            'L' [FileInfo...] (any number of batches), then 'K' {}
//	read            'd' file bytes (any number), then 'f' (end of file)
//	write           client sends 'D' file bytes (any number), then 'F' (end);
//	                server answers 'K' {} once the file is in place
//	exec            'P' {"pid"}, then 'O' stdout and 'e' stderr bytes as the
//	                process writes them, 'W' stdin credit, 'C' (the process
//	                closed its stdin), and last 'X' {"code","signal"};
//	                meanwhile the client may send 'I' stdin bytes, 'E' (stdin
//	                EOF), 'S' (1 byte: a signal number), 'Z' (cancel: kill
//	                the process group) and 'T' (4 bytes: rows and columns,
//	                each big endian uint16: resize the terminal). With
//	                "wait" the server may hold 'P' back until its next
//	                frame or for at most 10 ms, and write both at once
//	                (an older server sends it at once: the same frames)
//
// An exec may share its connection with the execs before and after it: a
// client that asks with "reuse" and gets {"reuse":true} in 'P' (servers that
// predate it leave it out, and close after 'X' as before) sends 'N' (end of
// the exec) once it has read 'X'; everything it sent before 'N' belongs to
// that exec, and the next request may follow on the same connection. The
// server writes nothing of an exec after its 'X' (the stdin writer has
// stopped by then). Clients keep at most a few such idle connections per
// sandbox (Client.Pooled) and send 'N' together with the next request. A
// pooled connection that init closed meanwhile (init restarted, the sandbox
// stopped) shows in the write of that request (EPIPE) or as ECONNRESET before
// any answer (init closed it with the request unread); then, and only then,
// the exec is sent again on a new connection: nothing ran. An activate
// with "reuse" answered {"reuse":true} leaves its connection the same way
// (after 'K' and the entrypoint's start): a pooled client keeps it and
// sends 'N' with its first exec, so a claimed sandbox's first exec skips
// the dial. Older servers answer {} and close.
//
// An exec with "pty" {"rows","cols","term"} runs on a pseudo-terminal that
// init allocates: the process is a session leader with the terminal as its
// controlling tty and stdin, stdout and stderr; the master stays in init.
// 'P' then says {"pid","pty":true} (an init without terminals leaves pty
// out, and the client cancels the exec), 'O' frames carry the terminal's
// output (bounded like any output: MaxChunk), 'e' is unused, 'I' types into
// the terminal, 'E' is ignored (type ^D instead: the terminal stays open),
// and a cancel or an 'S' of SIGKILL kills the whole session (background
// jobs in their own process groups too); other signals go to the process's
// group as for any exec.
//
// Any op may end with 'R' {"class","message"} instead: an error whose class
// (not_found, invalid_argument, ...) the client turns back into the matching
// errdefs error. Closing the connection cancels the op, except for exec: the
// client cancels an exec with 'Z', which kills its process group, and then
// closes. An exec whose connection just ends (chalkd was killed or
// restarted) runs on to its end with stdin at EOF and its output discarded:
// nothing a user started in a sandbox depends on chalkd's lifetime.
//
// # Hostile peers
//
// The host treats every byte from init as hostile (the sandbox's root can
// replace init's socket, or init itself): frames are bounded per type
// (serverFrameLimit), decoded fields are bounded (error messages to
// MaxErrorMessage, listings to MaxListEntries entries of names of at most
// MaxNameLen bytes), and the host reaches init only through DialSocket,
// which refuses anything but the sandbox's own init.
//
// # Flow control
//
// Nothing buffers more than a frame per stream. Output: the server reads a
// pipe only after the previous chunk went into the socket, so a process
// writing faster than the host reads blocks in write(2), the socket and the
// pipe being the only buffers. Stdin: the client may have at most StdinWindow
// bytes sent and not yet written into the process's stdin pipe; the server
// returns credit with 'W' (4 bytes, big endian: bytes written) as the process
// reads. So the server never blocks reading the connection, and a signal or
// a cancel reaches a process that does not read its stdin.
package procapi

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// ProtocolVersion is the version of the wire protocol this package speaks.
const ProtocolVersion = 1

// Frame types.
const (
	frameRequest     = 'Q'
	frameStdin       = 'I'
	frameStdinEOF    = 'E'
	frameSignal      = 'S'
	frameCancel      = 'Z'
	frameEnd         = 'N'
	frameResize      = 'T'
	frameData        = 'D'
	frameDataEnd     = 'F'
	frameStarted     = 'P'
	frameStdout      = 'O'
	frameStderr      = 'e'
	frameCredit      = 'W'
	frameStdinClosed = 'C'
	frameExit        = 'X'
	frameFile        = 'd'
	frameFileEnd     = 'f'
	frameList        = 'L'
	frameResult      = 'K'
	frameError       = 'R'
)

const (
	// MaxChunk is the largest payload of a data frame.
	MaxChunk = 64 << 10
	// MaxFrame is the largest payload of any frame (requests with long
	// argv/env, directory listing batches).
	MaxFrame = 1 << 20
	// StdinWindow is how many stdin bytes a client may have in flight.
	StdinWindow = 256 << 10
	// frameHeader is the size of a frame header.
	frameHeader = 5
	// maxControl is the largest payload of a JSON control frame from the
	// server (started, exit, result, error).
	maxControl = 64 << 10
	// MaxErrorMessage is the longest error message taken from the server;
	// longer ones are cut.
	MaxErrorMessage = 4 << 10
)

// serverFrameLimit is the largest payload the client accepts in a frame of
// type typ from the server.
func serverFrameLimit(typ byte) uint32 {
	switch typ {
	case frameStdout, frameStderr, frameFile:
		return MaxChunk
	case frameCredit:
		return 4
	case frameStdinClosed, frameFileEnd:
		return 0
	case frameStarted, frameExit, frameResult, frameError:
		return maxControl
	}
	return MaxFrame // directory listings; frame types of newer servers
}

// frameWriter writes frames to one connection; it is not safe for concurrent
// use (callers serialise).
type frameWriter struct {
	w   io.Writer
	hdr [frameHeader]byte
	// small holds header+payload of small frames so they go out in one write.
	small [frameHeader + 512]byte
}

// writeFrame writes one frame in one write(2)/writev(2) when w is a net.Conn.
func (fw *frameWriter) writeFrame(typ byte, payload []byte) error {
	if len(payload) > MaxFrame {
		return fmt.Errorf("frame of %d bytes exceeds %d: %w", len(payload), MaxFrame, errdefs.ErrInvalidArgument)
	}
	if len(payload) <= len(fw.small)-frameHeader {
		b := fw.small[:frameHeader+len(payload)]
		putHeader(b, typ, len(payload))
		copy(b[frameHeader:], payload)
		_, err := fw.w.Write(b)
		return err
	}
	putHeader(fw.hdr[:], typ, len(payload))
	bufs := net.Buffers{fw.hdr[:], payload}
	_, err := bufs.WriteTo(fw.w)
	return err
}

// writeFrameAfter writes prefix (whole frames already encoded) and then
// one frame, in one write(2) (one writev(2) for a large payload when w is
// a net.Conn).
func (fw *frameWriter) writeFrameAfter(prefix []byte, typ byte, payload []byte) error {
	if len(payload) > MaxFrame {
		return fmt.Errorf("frame of %d bytes exceeds %d: %w", len(payload), MaxFrame, errdefs.ErrInvalidArgument)
	}
	if n := len(prefix) + frameHeader + len(payload); n <= 4<<10 {
		b := make([]byte, n)
		copy(b, prefix)
		putHeader(b[len(prefix):], typ, len(payload))
		copy(b[len(prefix)+frameHeader:], payload)
		_, err := fw.w.Write(b)
		return err
	}
	putHeader(fw.hdr[:], typ, len(payload))
	bufs := net.Buffers{prefix, fw.hdr[:], payload}
	_, err := bufs.WriteTo(fw.w)
	return err
}

// encodeFrame returns typ and payload as one frame.
func encodeFrame(typ byte, payload []byte) []byte {
	b := make([]byte, frameHeader+len(payload))
	putHeader(b, typ, len(payload))
	copy(b[frameHeader:], payload)
	return b
}

func (fw *frameWriter) writeJSON(typ byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return fw.writeFrame(typ, b)
}

func putHeader(b []byte, typ byte, n int) {
	b[0] = typ
	binary.BigEndian.PutUint32(b[1:frameHeader], uint32(n))
}

// readFrame reads one frame of at most MaxFrame bytes. The payload is read
// into buf when it fits (and then aliases it), else into a new slice.
func readFrame(r io.Reader, buf []byte) (byte, []byte, error) {
	return readFrameMax(r, buf, func(byte) uint32 { return MaxFrame })
}

// readServerFrame reads one frame from the server, bounded per type by
// serverFrameLimit.
func readServerFrame(r io.Reader, buf []byte) (byte, []byte, error) {
	return readFrameMax(r, buf, serverFrameLimit)
}

// readFrameMax reads one frame whose payload is at most limit(type) bytes;
// a larger one is refused before its payload is read.
func readFrameMax(r io.Reader, buf []byte, limit func(byte) uint32) (byte, []byte, error) {
	var hdr [frameHeader]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if max := limit(hdr[0]); n > max {
		return 0, nil, fmt.Errorf("procapi: frame %q of %d bytes exceeds %d: %w", hdr[0], n, max, errdefs.ErrInvalidArgument)
	}
	if int(n) > cap(buf) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return hdr[0], buf, nil
}

// Operations.
const (
	opPing     = "ping"
	opActivate = "activate"
	opExec     = "exec"
	opRead     = "read"
	opWrite    = "write"
	opStat     = "stat"
	opList     = "list"
	opRemove   = "remove"
)

// request is the opening frame of every operation.
type request struct {
	Op        string   `json:"op"`
	Argv      []string `json:"argv,omitempty"`
	Env       []string `json:"env,omitempty"`
	Dir       string   `json:"dir,omitempty"`
	Stdin     bool     `json:"stdin,omitempty"`
	User      string   `json:"user,omitempty"`
	Path      string   `json:"path,omitempty"`
	Mode      uint32   `json:"mode,omitempty"`
	Recursive bool     `json:"recursive,omitempty"`
	PTY       *PTY     `json:"pty,omitempty"`
	// Wait (exec): the client only waits for the end, so the server may
	// hold the started frame back (at most startHold) and write it with
	// the first output or the exit.
	Wait bool `json:"wait,omitempty"`
	// Reuse (exec, activate): the client will end the exec with frameEnd
	// after its exit frame (the activation after its result) and may then
	// send the next request on the connection.
	Reuse bool `json:"reuse,omitempty"`
}

// activatedMsg is activate's result: Reuse as in startedMsg (older
// servers answer {} and close).
type activatedMsg struct {
	Reuse bool `json:"reuse,omitempty"`
}

type pingMsg struct {
	Version int `json:"version"`
}

type startedMsg struct {
	Pid int  `json:"pid"`
	PTY bool `json:"pty,omitempty"` // the exec runs on a terminal
	// Reuse: the server takes the next request on this connection once
	// the client has ended the exec (request.Reuse; older servers leave
	// it out and close the connection after the exit frame).
	Reuse bool `json:"reuse,omitempty"`
}

type exitMsg struct {
	Code   int    `json:"code"`
	Signal string `json:"signal,omitempty"`
}

type errorMsg struct {
	Class   string `json:"class"`
	Message string `json:"message"`
}

// classNames are the wire names of the errdefs classes.
var classNames = []struct {
	name string
	err  error
}{
	{"not_found", errdefs.ErrNotFound},
	{"already_exists", errdefs.ErrAlreadyExists},
	{"invalid_argument", errdefs.ErrInvalidArgument},
	{"failed_precondition", errdefs.ErrFailedPrecondition},
	{"unauthenticated", errdefs.ErrUnauthenticated},
	{"permission_denied", errdefs.ErrPermissionDenied},
	{"resource_exhausted", errdefs.ErrResourceExhausted},
	{"deadline_exceeded", errdefs.ErrDeadlineExceeded},
	{"unavailable", errdefs.ErrUnavailable},
}

// wireError encodes err with its class ("internal" when it has none).
func wireError(err error) errorMsg {
	for _, c := range classNames {
		if errors.Is(err, c.err) {
			return errorMsg{Class: c.name, Message: err.Error()}
		}
	}
	return errorMsg{Class: "internal", Message: err.Error()}
}

// RemoteError is an error reported by a sandbox's init. It unwraps to the
// errdefs class the server gave it (none for internal errors).
type RemoteError struct {
	Message string // as the server wrote it; it already names the class
	class   error
}

func (e *RemoteError) Error() string { return e.Message }
func (e *RemoteError) Unwrap() error { return e.class }

// decodeError turns an error frame back into an error of its class.
func decodeError(b []byte) error {
	var m errorMsg
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("procapi: malformed error frame: %v: %w", err, errdefs.ErrUnavailable)
	}
	if len(m.Message) > MaxErrorMessage {
		m.Message = strings.ToValidUTF8(m.Message[:MaxErrorMessage], "") + " [cut at procapi.MaxErrorMessage]"
	}
	e := &RemoteError{Message: m.Message}
	for _, c := range classNames {
		if c.name == m.Class {
			e.class = c.err
		}
	}
	if e.Message == "" {
		// The class is the server's too: named only cut short (an unknown
		// class of any length must not pass MaxErrorMessage this way).
		class := m.Class
		if len(class) > maxClassName {
			class = strings.ToValidUTF8(class[:maxClassName], "") + "…"
		}
		e.Message = fmt.Sprintf("procapi: error of class %q", class)
	}
	return e
}

// maxClassName bounds an error class name quoted in a message (the known
// ones are far shorter).
const maxClassName = 64
