package procapi

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// The host's side against a hostile init: a sandbox's root can replace
// init, so every answer is untrusted input that must cost the host bounded
// memory and end in an error rather than a panic or a hang.

// hostile is a client whose every connection is answered with the bytes
// answer returns for the operation (then the server closes); what the
// client sends is read and dropped.
func hostile(answer func(op string) []byte) *Client {
	return NewClient("hostile", func(ctx context.Context) (net.Conn, error) {
		cli, srv := net.Pipe()
		go func() {
			defer srv.Close()
			typ, b, err := readFrame(srv, nil)
			if err != nil || typ != frameRequest {
				return
			}
			var req request
			_ = json.Unmarshal(b, &req)
			go func() { _, _ = io.Copy(io.Discard, srv) }()
			_, _ = srv.Write(answer(req.Op))
		}()
		return cli, nil
	})
}

func rawFrame(typ byte, payload []byte) []byte {
	b := make([]byte, frameHeader, frameHeader+len(payload))
	b[0] = typ
	binary.BigEndian.PutUint32(b[1:], uint32(len(payload)))
	return append(b, payload...)
}

// header is a frame header announcing n bytes, without them.
func header(typ byte, n uint32) []byte {
	b := make([]byte, frameHeader)
	b[0] = typ
	binary.BigEndian.PutUint32(b[1:], n)
	return b
}

func listFrame(names ...string) []byte {
	fis := make([]FileInfo, len(names))
	for i, n := range names {
		fis[i] = FileInfo{Name: n}
	}
	b, _ := json.Marshal(fis)
	return rawFrame(frameList, b)
}

// endlessListing is more list frames than MaxListEntries allows.
func endlessListing() []byte {
	var out bytes.Buffer
	names := make([]string, listBatch)
	for i := 0; i*listBatch <= MaxListEntries; i++ {
		for j := range names {
			names[j] = fmt.Sprintf("f%d-%d", i, j)
		}
		out.Write(listFrame(names...))
	}
	out.Write(rawFrame(frameResult, []byte("{}")))
	return out.Bytes()
}

// TestHostileServer: answers over a limit, malformed or of the wrong type
// are errors of class unavailable (or resource exhausted for a listing over
// MaxListEntries); none is taken in.
func TestHostileServer(t *testing.T) {
	ctx := testCtx(t)
	emptyEntries := append([]byte("["), bytes.Repeat([]byte("{},"), 300_000)...)
	emptyEntries = append(emptyEntries[:len(emptyEntries)-1], ']')
	cases := []struct {
		name   string
		op     func(c *Client) error
		answer []byte
		class  error
		want   string // in the message
	}{
		{"listing over MaxListEntries", listOp, endlessListing(), errdefs.ErrResourceExhausted, "MaxListEntries"},
		{"a frame of empty entries", listOp, rawFrame(frameList, emptyEntries), errdefs.ErrUnavailable, "malformed listing"},
		{"a name with a slash", listOp, listFrame("a", "../../etc/passwd"), errdefs.ErrUnavailable, "malformed listing"},
		{"a name over MaxNameLen", listOp, listFrame(strings.Repeat("n", MaxNameLen+1)), errdefs.ErrUnavailable, "malformed listing"},
		{"a name .", listOp, listFrame("."), errdefs.ErrUnavailable, "malformed listing"},
		{"a listing that is not an array", listOp, rawFrame(frameList, []byte(`{"name":"x"}`)), errdefs.ErrUnavailable, "malformed listing"},
		{"trailing garbage in a listing", listOp, rawFrame(frameList, []byte(`[{"name":"x"}]]`)), errdefs.ErrUnavailable, "malformed listing"},
		{"list frame over MaxFrame", listOp, header(frameList, MaxFrame+1), errdefs.ErrUnavailable, "exceeds"},
		{"stdout frame over MaxChunk", execOp, append(rawFrame(frameStarted, []byte(`{"pid":1}`)), header(frameStdout, MaxChunk+1)...), errdefs.ErrUnavailable, "exceeds"},
		{"start frame over its limit", execOp, header(frameStarted, maxControl+1), errdefs.ErrUnavailable, "exceeds"},
		{"credit frame of 5 bytes", execOp, append(rawFrame(frameStarted, []byte(`{"pid":1}`)), rawFrame(frameCredit, make([]byte, 5))...), errdefs.ErrUnavailable, "exceeds"},
		{"exit frame not JSON", execOp, append(rawFrame(frameStarted, []byte(`{"pid":1}`)), rawFrame(frameExit, []byte("{"))...), errdefs.ErrUnavailable, "malformed exit"},
		{"file frame over MaxChunk", readOp, header(frameFile, MaxChunk+1), errdefs.ErrUnavailable, "exceeds"},
		{"result over its limit", statOp, header(frameResult, maxControl+1), errdefs.ErrUnavailable, "exceeds"},
		{"error over its limit", statOp, header(frameError, maxControl+1), errdefs.ErrUnavailable, "exceeds"},
		{"truncated frame", statOp, header(frameResult, 10), errdefs.ErrUnavailable, "connection to sandbox init lost"},
		{"unexpected frame", statOp, rawFrame(frameStdout, []byte("x")), errdefs.ErrUnavailable, "unexpected frame"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := hostile(func(string) []byte { return tc.answer })
			err := tc.op(c)
			if !errors.Is(err, tc.class) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v; want class %v and %q in the message", err, tc.class, tc.want)
			}
		})
	}

	// An error message is cut at MaxErrorMessage (and stays valid UTF-8).
	long, _ := json.Marshal(errorMsg{Class: "not_found", Message: strings.Repeat("é", maxControl/4)})
	c := hostile(func(string) []byte { return rawFrame(frameError, long) })
	_, err := c.Stat(ctx, "/x")
	if !errors.Is(err, errdefs.ErrNotFound) || len(err.Error()) > MaxErrorMessage+64 || !utf8.ValidString(err.Error()) {
		t.Fatalf("long error: class ok %v, %d bytes, valid UTF-8 %v", errors.Is(err, errdefs.ErrNotFound), len(err.Error()), utf8.ValidString(err.Error()))
	}
}

func listOp(c *Client) error {
	_, err := c.ListDir(context.Background(), "/d")
	return err
}

func statOp(c *Client) error {
	_, err := c.Stat(context.Background(), "/x")
	return err
}

func readOp(c *Client) error {
	r, err := c.ReadFile(context.Background(), "/x")
	if err != nil {
		return err
	}
	defer r.Close()
	_, err = io.Copy(io.Discard, r)
	return err
}

func execOp(c *Client) error {
	p, err := c.Exec(context.Background(), ExecRequest{Argv: []string{"x"}}, nil, nil)
	if err != nil {
		return err
	}
	_, err = p.Wait()
	return err
}

// TestListDirLimit: a real directory over MaxListEntries is refused with
// an error naming the limit; one at the limit lists in full.
func TestListDirLimit(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	dir := t.TempDir()
	for i := range MaxListEntries + 1 {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("f%05d", i)))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	_, err := c.ListDir(ctx, dir)
	if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "MaxListEntries") {
		t.Fatalf("listing %d entries: %v; want resource exhausted naming MaxListEntries", MaxListEntries+1, err)
	}
	if err := os.Remove(filepath.Join(dir, "f00000")); err != nil {
		t.Fatal(err)
	}
	fis, err := c.ListDir(ctx, dir)
	if err != nil || len(fis) != MaxListEntries {
		t.Fatalf("listing %d entries: %d, %v", MaxListEntries, len(fis), err)
	}
}

// FuzzClientResponse: whatever a (hostile) init answers, every client
// operation ends in a result or an error, never a panic, and what it
// returns respects the limits.
func FuzzClientResponse(f *testing.F) {
	f.Add([]byte(nil))
	f.Add(rawFrame(frameResult, []byte(`{"version":1}`)))
	f.Add(append(listFrame("a", "b"), rawFrame(frameResult, []byte(`{}`))...))
	f.Add(rawFrame(frameError, []byte(`{"class":"not_found","message":"no"}`)))
	f.Add(append(append(rawFrame(frameStarted, []byte(`{"pid":7}`)), rawFrame(frameStdout, []byte("out"))...), rawFrame(frameExit, []byte(`{"code":3}`))...))
	f.Add(append(rawFrame(frameFile, []byte("data")), rawFrame(frameFileEnd, nil)...))
	f.Add(header(frameList, MaxFrame))
	f.Fuzz(func(t *testing.T, answer []byte) {
		c := hostile(func(string) []byte { return answer })
		ctx := context.Background()
		check := func(op string, err error) {
			if err == nil {
				return
			}
			if len(err.Error()) > MaxErrorMessage+maxControl/8 {
				t.Fatalf("%s: error of %d bytes", op, len(err.Error()))
			}
		}
		_ = c.Ping(ctx)
		fis, err := c.ListDir(ctx, "/d")
		check("list", err)
		if len(fis) > MaxListEntries {
			t.Fatalf("listing of %d entries", len(fis))
		}
		for _, fi := range fis {
			if fi.Name == "" || len(fi.Name) > MaxNameLen || strings.Contains(fi.Name, "/") {
				t.Fatalf("entry name %q", fi.Name)
			}
		}
		_, err = c.Stat(ctx, "/x")
		check("stat", err)
		check("read", readOp(c))
		var out bytes.Buffer
		if p, err := c.Exec(ctx, ExecRequest{Argv: []string{"x"}}, &out, &out); err == nil {
			_, err = p.Wait()
			check("exec", err)
		} else {
			check("exec", err)
		}
	})
}
