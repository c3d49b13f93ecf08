package noderpc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestDialSandbox: the control plane reaches a sandbox port through the
// node: bytes both ways (more than a window of them), the half-close
// reaching the sandbox's server and its answer after it coming back; the
// node dials only with its dialer (refused without one), names the target
// once, and a dial error keeps its class.
func TestDialSandbox(t *testing.T) {
	f := newFakeNode()
	c, srv := serve(t, f)
	ctx := ctxT(t)
	if _, err := c.DialSandbox(ctx, "sb-1", 8080); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("dial on a node without a dialer: %v, want failed precondition", err)
	}
	// The sandbox's server: reads all, then answers its size and the data.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				b, _ := io.ReadAll(conn)
				fmt.Fprintf(conn, "%d:", len(b))
				conn.Write(b)
			}()
		}
	}()
	var dialled []string
	srv.WithDialer(func(ctx context.Context, id string, port uint16) (net.Conn, error) {
		dialled = append(dialled, fmt.Sprintf("%s:%d", id, port))
		if id != "sb-1" {
			return nil, fmt.Errorf("sandbox %q is not on this node: %w", id, errdefs.ErrNotFound)
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", l.Addr().String())
	})
	if _, err := c.DialSandbox(ctx, "sb-2", 8080); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("dial of a sandbox not on the node: %v, want not found", err)
	}
	if _, err := c.DialSandbox(ctx, "../etc", 8080); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("dial of a bad id: %v, want invalid argument", err)
	}
	conn, err := c.DialSandbox(ctx, "sb-1", 8080)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB: many windows
	go func() {
		conn.Write(data)
		conn.(interface{ CloseWrite() error }).CloseWrite()
	}()
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]byte(fmt.Sprintf("%d:", len(data))), data...)
	if !bytes.Equal(got, want) {
		t.Fatalf("echo: %d bytes, want %d", len(got), len(want))
	}
	if fmt.Sprint(dialled) != "[sb-2:8080 sb-1:8080]" {
		t.Errorf("the node dialled %v", dialled)
	}
}
