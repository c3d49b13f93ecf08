// Package procapi is the process API between the host and a sandbox's init
// (cmd/chalk-init): start processes with streamed stdin/stdout/stderr, signal
// and wait for them, and read, write, list and remove files. Exec through it
// costs one unix-socket connection and a fork — no `runc exec`.
//
// Wire protocol: one unix stream connection per operation. Both sides send
// frames: 1 byte type, 4 bytes big-endian payload length, payload. The client
// opens with a request frame (JSON). Data frames carry at most MaxChunk bytes,
// so neither side buffers more than a frame: a process writing gigabytes is
// slowed to the speed of the reader (backpressure through the socket).
//
//	client → server                      server → client
//	'Q' request JSON                     'P' started JSON {"pid"}
//	'I' stdin bytes                      'O' stdout bytes, 'e' stderr bytes
//	'E' stdin EOF                        'X' exit JSON {"code","signal"}
//	'S' signal (1 byte: number)          'd' file bytes, 'f' end of file
//	'D' file bytes, 'F' end of file      'K' result JSON, 'R' error JSON {"class","message"}
package procapi

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Frame types.
const (
	frameRequest  = 'Q'
	frameStdin    = 'I'
	frameStdinEOF = 'E'
	frameSignal   = 'S'
	frameData     = 'D'
	frameDataEnd  = 'F'
	frameStarted  = 'P'
	frameStdout   = 'O'
	frameStderr   = 'e'
	frameExit     = 'X'
	frameFile     = 'd'
	frameFileEnd  = 'f'
	frameResult   = 'K'
	frameError    = 'R'
)

// MaxChunk is the largest data payload in one frame.
const MaxChunk = 64 << 10

// maxFrame bounds any frame (JSON results such as directory listings).
const maxFrame = 16 << 20

// writeFrame writes one frame.
func writeFrame(w io.Writer, typ byte, payload []byte) error {
	if len(payload) > maxFrame {
		return fmt.Errorf("frame of %d bytes: %w", len(payload), errdefs.ErrResourceExhausted)
	}
	var hdr [5]byte
	hdr[0] = typ
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(payload)))
	if len(payload) == 0 {
		_, err := w.Write(hdr[:])
		return err
	}
	// One write for small frames keeps them in one segment.
	if len(payload) <= 4096 {
		buf := make([]byte, 5+len(payload))
		copy(buf, hdr[:])
		copy(buf[5:], payload)
		_, err := w.Write(buf)
		return err
	}
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err := w.Write(payload)
	return err
}

func writeJSON(w io.Writer, typ byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return writeFrame(w, typ, b)
}

// readFrame reads one frame, reusing buf when it is large enough.
func readFrame(r io.Reader, buf []byte) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > maxFrame {
		return 0, nil, fmt.Errorf("procapi: frame of %d bytes exceeds the limit: %w", n, errdefs.ErrInvalidArgument)
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

// request is the opening frame of every operation.
type request struct {
	Op        string   `json:"op"` // ping, exec, read, write, stat, list, remove
	Argv      []string `json:"argv,omitempty"`
	Env       []string `json:"env,omitempty"`
	Dir       string   `json:"dir,omitempty"`
	Stdin     bool     `json:"stdin,omitempty"`
	User      string   `json:"user,omitempty"`
	Path      string   `json:"path,omitempty"`
	Mode      uint32   `json:"mode,omitempty"`
	Recursive bool     `json:"recursive,omitempty"`
}

type startedMsg struct {
	Pid int `json:"pid"`
}

type exitMsg struct {
	Code   int    `json:"code"`
	Signal string `json:"signal,omitempty"`
}

type errorMsg struct {
	Class   string `json:"class"`
	Message string `json:"message"`
}

var classNames = []struct {
	name string
	err  error
}{
	{"not_found", errdefs.ErrNotFound},
	{"already_exists", errdefs.ErrAlreadyExists},
	{"invalid_argument", errdefs.ErrInvalidArgument},
	{"failed_precondition", errdefs.ErrFailedPrecondition},
	{"permission_denied", errdefs.ErrPermissionDenied},
	{"resource_exhausted", errdefs.ErrResourceExhausted},
}

// wireError encodes err with its class.
func wireError(err error) errorMsg {
	for _, c := range classNames {
		if errors.Is(err, c.err) {
			return errorMsg{Class: c.name, Message: err.Error()}
		}
	}
	return errorMsg{Class: "internal", Message: err.Error()}
}

// remoteError is an error reported by the server, wrapping its class.
type remoteError struct {
	msg   string
	class error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.class }

func decodeError(b []byte) error {
	var m errorMsg
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("procapi: bad error frame: %w", err)
	}
	for _, c := range classNames {
		if c.name == m.Class {
			// The message already names the class ("...: not found"); keep it as the server wrote it.
			return &remoteError{msg: m.Message, class: c.err}
		}
	}
	return errors.New(m.Message)
}
