package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/procapi"
)

// TestExecFlushes: an exec's start and output reach the client while the
// process runs (flushed message by message), and only its exit status is
// held back to go out with the end of the stream — the status and the
// end-of-stream message in one chunk of the HTTP body, then the body's end.
// Three execs on one kept-alive connection each end cleanly.
func TestExecFlushes(t *testing.T) {
	tn := newTestNode(t, Config{})
	c := tn.user("mia")
	sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
	tn.node.exec = func(req procapi.ExecRequest, _ io.Reader, stdout, stderr io.Writer, sig <-chan syscall.Signal) int {
		if req.Argv[0] == "true" {
			return 0
		}
		io.WriteString(stdout, "ready")
		s := <-sig // only once the client has seen "ready"
		io.WriteString(stderr, "bye")
		return 128 + int(s)
	}

	// Through the Connect client: output before the exit is not held.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range 3 {
		s, err := c.sandbox.Exec(ctx, connect.NewRequest(&v1.ExecRequest{SandboxId: sb.Id, Argv: []string{"wait"}}))
		if err != nil {
			t.Fatal(err)
		}
		var events []string
		var id string
		for s.Receive() {
			switch e := s.Msg().Event.(type) {
			case *v1.ExecEvent_Started:
				id = e.Started.ExecId
				events = append(events, "started")
			case *v1.ExecEvent_Stdout:
				events = append(events, "stdout "+string(e.Stdout))
				// The process waits for this signal: were the output held
				// until the end, this exec would never end (ctx's timeout).
				if _, err := c.sandbox.SignalExec(ctx, connect.NewRequest(&v1.SignalExecRequest{SandboxId: sb.Id, ExecId: id, Signal: "TERM"})); err != nil {
					t.Fatal(err)
				}
			case *v1.ExecEvent_Stderr:
				events = append(events, "stderr "+string(e.Stderr))
			case *v1.ExecEvent_Exited:
				events = append(events, fmt.Sprintf("exited %d", e.Exited.ExitCode))
			}
		}
		if err := s.Err(); err != nil {
			t.Fatalf("exec %d: %v (events %q)", i, err, events)
		}
		s.Close()
		want := []string{"started", "stdout ready", "stderr bye", fmt.Sprintf("exited %d", 128+int(syscall.SIGTERM))}
		if strings.Join(events, "|") != strings.Join(want, "|") {
			t.Fatalf("exec %d: events %q, want %q", i, events, want)
		}
	}

	// On the wire: the exit status and the end of the stream share the
	// body's last chunk.
	chunks := rawExecChunks(t, tn, &v1.ExecRequest{SandboxId: sb.Id, Argv: []string{"true"}})
	if len(chunks) < 2 {
		t.Fatalf("chunks %q: want the start, then the exit with the end of the stream", chunks)
	}
	msgs := envelopes(t, chunks[len(chunks)-1])
	if len(msgs) != 2 || msgs[0].flags != 0 || msgs[1].flags != 2 {
		t.Fatalf("last chunk holds %+v: want the exit status and the end-of-stream message", msgs)
	}
	var ev v1.ExecEvent
	if err := protojson.Unmarshal(msgs[0].data, &ev); err != nil || ev.GetExited() == nil || ev.GetExited().ExitCode != 0 {
		t.Fatalf("last chunk's message %s: %v", msgs[0].data, err)
	}
	if string(msgs[1].data) != "{}" {
		t.Fatalf("end of stream %s: want {} (no error)", msgs[1].data)
	}
	for _, ch := range chunks[:len(chunks)-1] {
		for _, m := range envelopes(t, ch) {
			if m.flags != 0 || !bytes.Contains(m.data, []byte("started")) {
				t.Fatalf("chunk before the last holds %+v: want only the start", m)
			}
		}
	}
}

// rawExecChunks runs an exec over a plain HTTP/1.1 connection (Connect's
// streaming protocol, JSON) and returns the response body's chunks as the
// server framed them (each flush of the server makes one; a body sent whole
// when the handler returned, with its length, is one).
func rawExecChunks(t *testing.T, tn *testNode, r *v1.ExecRequest) [][]byte {
	t.Helper()
	u, err := url.Parse(tn.url)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	msg, err := protojson.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	body := make([]byte, 5, 5+len(msg))
	binary.BigEndian.PutUint32(body[1:], uint32(len(msg)))
	body = append(body, msg...)
	req, err := http.NewRequest("POST", tn.url+computev1connect.SandboxServiceExecProcedure, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/connect+json")
	req.Header.Set("Authorization", "Bearer "+tn.keys["mia"])
	if err := req.Write(conn); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode == 200 && len(resp.TransferEncoding) == 0 && resp.ContentLength > 0 {
		// Nothing was flushed before the handler returned: the whole body
		// went out with the header, its length known.
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return [][]byte{b}
	}
	if resp.StatusCode != 200 || len(resp.TransferEncoding) == 0 || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("response %s, transfer encoding %q", resp.Status, resp.TransferEncoding)
	}
	// http.ReadResponse would undo the chunking; read it from br itself.
	var chunks [][]byte
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("chunk size: %v", err)
		}
		n, err := strconv.ParseInt(strings.TrimSpace(line), 16, 32)
		if err != nil {
			t.Fatalf("chunk size %q: %v", line, err)
		}
		if n == 0 {
			return chunks
		}
		ch := make([]byte, n+2)
		if _, err := io.ReadFull(br, ch); err != nil {
			t.Fatal(err)
		}
		chunks = append(chunks, ch[:n])
	}
}

// TestExecWaitHoldsStart: an exec whose caller only waits (wait) gets its
// start, its exit status and the end of the stream in one chunk (one write
// of the server), and init is asked to hold its start too; an exec without
// output that runs on gets its start once startHold has passed (the caller
// below ends the process only after seeing it).
func TestExecWaitHoldsStart(t *testing.T) {
	tn := newTestNode(t, Config{})
	c := tn.user("mia")
	sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
	var gotWait atomic.Bool
	seen := make(chan struct{})
	tn.node.exec = func(req procapi.ExecRequest, _ io.Reader, stdout, stderr io.Writer, sig <-chan syscall.Signal) int {
		gotWait.Store(req.Wait)
		if req.Argv[0] == "block" {
			<-seen
		}
		return 0
	}
	defer func(d time.Duration) { startHold = d }(startHold)
	startHold = time.Minute // the process's end comes first, however loaded the machine
	chunks := rawExecChunks(t, tn, &v1.ExecRequest{SandboxId: sb.Id, Argv: []string{"true"}, Wait: true})
	if len(chunks) != 1 {
		t.Fatalf("chunks %q: want one write (the start, the exit status, the end of the stream)", chunks)
	}
	msgs := envelopes(t, chunks[0])
	if len(msgs) != 3 || !bytes.Contains(msgs[0].data, []byte("started")) || !bytes.Contains(msgs[1].data, []byte("exited")) || msgs[2].flags != 2 {
		t.Fatalf("the chunk holds %+v: want the start, the exit status, the end of the stream", msgs)
	}
	if !gotWait.Load() {
		t.Error("the node was not asked to hold the start (procapi.ExecRequest.Wait)")
	}

	startHold = 10 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := c.sandbox.Exec(ctx, connect.NewRequest(&v1.ExecRequest{SandboxId: sb.Id, Argv: []string{"block"}, Wait: true}))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var events []string
	for s.Receive() {
		switch e := s.Msg().Event.(type) {
		case *v1.ExecEvent_Started:
			events = append(events, "started")
			close(seen) // were the start held to the end, this exec would never end
		case *v1.ExecEvent_Exited:
			events = append(events, fmt.Sprintf("exited %d", e.Exited.ExitCode))
		}
	}
	if err := s.Err(); err != nil || strings.Join(events, "|") != "started|exited 0" {
		t.Fatalf("events %q, err %v: want started|exited 0", events, err)
	}
}

type envelope struct {
	flags byte
	data  []byte
}

// envelopes splits b into Connect envelopes (flags, 4-byte length, data).
func envelopes(t *testing.T, b []byte) []envelope {
	t.Helper()
	var out []envelope
	for len(b) > 0 {
		if len(b) < 5 {
			t.Fatalf("truncated envelope %q", b)
		}
		n := int(binary.BigEndian.Uint32(b[1:5]))
		if len(b) < 5+n {
			t.Fatalf("envelope of %d bytes in %d", n, len(b)-5)
		}
		out = append(out, envelope{b[0], b[5 : 5+n]})
		b = b[5+n:]
	}
	return out
}

// TestHeldFlushWriter: flushes pass until held; holdFlushes outside an
// exec is a no-op; the writer unwraps for http.ResponseController.
func TestHeldFlushWriter(t *testing.T) {
	rec := httptest.NewRecorder()
	w := &heldFlushWriter{ResponseWriter: rec}
	w.Write([]byte("a"))
	w.Flush()
	if !rec.Flushed {
		t.Fatal("a flush before the hold did not reach the connection's writer")
	}
	rec.Flushed = false
	ctx := context.WithValue(context.Background(), heldFlushKey{}, w)
	holdFlushes(ctx)
	w.Write([]byte("b"))
	w.Flush()
	if rec.Flushed {
		t.Fatal("a flush after the hold reached the connection's writer")
	}
	holdFlushes(context.Background()) // no writer: nothing to hold, no panic
	if err := http.NewResponseController(w).Flush(); err != nil || rec.Flushed {
		t.Fatalf("the response controller's flush: %v, flushed %v (want it held too)", err, rec.Flushed)
	}
	if got := rec.Body.String(); got != "ab" {
		t.Fatalf("body %q", got)
	}
}
