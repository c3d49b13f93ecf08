package registry

import (
	"context"
	"net"
	"testing"
)

// TestFailoverDialer: a dial to the registry's address goes to the first
// alternate that accepts when the address does not, and stays there; other
// addresses are dialled as they are.
func TestFailoverDialer(t *testing.T) {
	live, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close() // nothing listens there now
	var dialled []string
	base := func(ctx context.Context, network, addr string) (net.Conn, error) {
		dialled = append(dialled, addr)
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	f := &failoverDialer{addr: deadAddr, addrs: []string{deadAddr, live.Addr().String()}, dialer: base}
	for range 2 {
		c, err := f.DialContext(context.Background(), "tcp", deadAddr)
		if err != nil {
			t.Fatalf("dial with a live alternate: %v", err)
		}
		if c.RemoteAddr().String() != live.Addr().String() {
			t.Fatalf("connected to %s, want the alternate %s", c.RemoteAddr(), live.Addr())
		}
		c.Close()
	}
	if len(dialled) != 3 || dialled[0] != deadAddr || dialled[2] != live.Addr().String() {
		t.Fatalf("dialled %v: want the dead address once, then the alternate that answered first", dialled)
	}
	if _, err := f.DialContext(context.Background(), "tcp", "127.0.0.1:1"); err == nil {
		t.Fatal("another address was redirected to the registry's alternates")
	}
	f2 := &failoverDialer{addr: deadAddr, addrs: []string{deadAddr}, dialer: base}
	if _, err := f2.DialContext(context.Background(), "tcp", deadAddr); err == nil {
		t.Fatal("a dial with no live address succeeded")
	}
}
