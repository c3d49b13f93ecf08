package daemon_test

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

var (
	probeOnce sync.Once
	probeBin  []byte
	probeErr  error
)

// netprobe is testdata/netprobe built static (busybox has no UDP tools).
func netprobe(t *testing.T) []byte {
	t.Helper()
	probeOnce.Do(func() {
		out := filepath.Join(os.TempDir(), "chalk-netprobe-"+time.Now().Format("150405.000000"))
		cmd := exec.Command("go", "build", "-o", out, "./testdata/netprobe")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			probeErr = errors.New(string(b))
			return
		}
		probeBin, probeErr = os.ReadFile(out)
		os.Remove(out)
	})
	if probeErr != nil {
		t.Fatalf("build netprobe: %v", probeErr)
	}
	return probeBin
}

func withProbe(t *testing.T, sb *chalkcompute.Sandbox) {
	t.Helper()
	if err := sb.WriteFile(ctxT(t, time.Minute), "/bin/netprobe", netprobe(t), 0o755); err != nil {
		t.Fatal(err)
	}
}

// outputWatch collects output and signals when a line containing want arrives.
type outputWatch struct {
	mu   sync.Mutex
	buf  strings.Builder
	want map[string]chan struct{}
}

func (w *outputWatch) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(b)
	for s, ch := range w.want {
		if strings.Contains(w.buf.String(), s) {
			close(ch)
			delete(w.want, s)
		}
	}
	return len(b), nil
}

func (w *outputWatch) until(s string) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	ch := make(chan struct{})
	if strings.Contains(w.buf.String(), s) {
		close(ch)
		return ch
	}
	if w.want == nil {
		w.want = map[string]chan struct{}{}
	}
	w.want[s] = ch
	return ch
}

func (w *outputWatch) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// TestTunnel: sandboxes in a tunnel reach each other over WireGuard on TCP and
// UDP; a sandbox outside cannot; a member cannot spoof another member's
// address; the private key is nowhere in the sandbox; a member that leaves
// is gone from the others' peers; the metadata service lists the members.
func TestTunnel(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 5*time.Minute)
	a := create(t, c, chalkcompute.WithTunnels("mesh"))
	b := create(t, c, chalkcompute.WithTunnels("mesh"))
	m := create(t, c, chalkcompute.WithTunnels("mesh"))
	x := create(t, c) // not in the tunnel
	tun, err := c.Tunnel(ctx, "mesh")
	if err != nil {
		t.Fatal(err)
	}
	if len(tun.Members) != 3 || !strings.HasPrefix(tun.Subnet, "100.96.") {
		t.Fatalf("tunnel: %+v", tun)
	}
	addr := map[string]string{}
	for _, mb := range tun.Members {
		addr[mb.SandboxID] = mb.Address
		if mb.Interface != "wg0" || mb.PublicKey == "" {
			t.Fatalf("member %+v", mb)
		}
	}
	// Inside: wg0 with the member's address; the metadata service lists the members.
	if out := mustExec(t, a, "ip", "-4", "-o", "addr", "show", "wg0"); !strings.Contains(out, addr[a.ID()]+"/24") {
		t.Fatalf("wg0 in a: %q, want %s/24", out, addr[a.ID()])
	}
	var md struct {
		Tunnels []struct {
			Tunnel, Address string
			Members         []struct{ SandboxID, Address string } `json:"members"`
		} `json:"tunnels"`
	}
	out := mustExec(t, a, "wget", "-q", "-O-", "--header", "Metadata-Flavor: chalk", "http://169.254.169.254/v1/tunnels")
	if err := json.Unmarshal([]byte(strings.ReplaceAll(out, "sandbox_id", "SandboxID")), &md); err != nil || len(md.Tunnels) != 1 || md.Tunnels[0].Address != addr[a.ID()] || len(md.Tunnels[0].Members) != 3 {
		t.Fatalf("metadata /v1/tunnels: %q %v", out, err)
	}
	for _, sb := range []*chalkcompute.Sandbox{a, b, m, x} {
		withProbe(t, sb)
	}
	// b serves TCP and UDP on 7000.
	var served outputWatch
	ready := served.until("ready")
	srv, err := b.Start(ctx, []string{"netprobe", "serve", "7000"}, chalkcompute.Stdout(&served), chalkcompute.Stderr(&served))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-ready:
	case <-ctx.Done():
		t.Fatalf("server not ready: %q", served.String())
	}
	bAddr := addr[b.ID()] + ":7000"
	if out := mustExec(t, a, "netprobe", "tcp", bAddr, "hello-tcp"); out != "echo hello-tcp\n" {
		t.Fatalf("TCP over the tunnel: %q", out)
	}
	if out := mustExec(t, a, "netprobe", "udp", bAddr, "hello-udp"); out != "echo hello-udp\n" {
		t.Fatalf("UDP over the tunnel: %q", out)
	}
	// The sandbox outside the tunnel has no way to the tunnel addresses.
	if res, err := x.Exec(ctx, []string{"netprobe", "tcp-once", bAddr, "intruder"}); err != nil || res.Code == 0 {
		t.Fatalf("sandbox outside the tunnel reached it: %v %+v", err, res)
	}
	// a sends one datagram claiming m's address (IP_FREEBIND needs no
	// privilege), then one of its own: b's device drops the first (m's
	// AllowedIPs are m's address alone, and it did not come from m's key).
	if _, err := a.Exec(ctx, []string{"netprobe", "udp-from", addr[m.ID()], bAddr, "spoofed"}); err != nil {
		t.Fatal(err)
	}
	got := served.until("udp " + addr[a.ID()] + " after-spoof")
	mustExec(t, a, "netprobe", "udp", bAddr, "after-spoof")
	<-got
	if strings.Contains(served.String(), "spoofed") {
		t.Fatalf("a spoofed datagram got through: %q", served.String())
	}
	// The private keys are nowhere in the sandbox: not in the environment or
	// files, and wg0 is not readable through netlink without CAP_NET_ADMIN.
	if res, _ := a.Exec(ctx, []string{"sh", "-c", "ip link set wg0 down"}); res == nil || res.Code == 0 {
		t.Fatal("the sandbox could take its tunnel interface down")
	}
	// m leaves: the others' devices forget it.
	if _, err := m.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	if tun, err := c.Tunnel(ctx, "mesh"); err != nil || len(tun.Members) != 2 {
		t.Fatalf("after m left: %+v %v", tun, err)
	}
	if _, err := a.Exec(ctx, []string{"netprobe", "udp", bAddr, "quit"}); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Wait(); err != nil {
		t.Fatal(err)
	}
	// A tunnel with members cannot be deleted; bad names are refused.
	if err := c.DeleteTunnel(ctx, "mesh"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("delete a tunnel in use: %v", err)
	}
	if _, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithTunnels("Bad_Name")); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "Bad_Name") {
		t.Fatalf("bad tunnel name: %v", err)
	}
}
