package daemon_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net/netip"
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
	"github.com/chalkcompute/chalkcompute/tunnel"
)

var (
	testBinMu sync.Mutex
	testBins  = map[string]string{} // testdata command -> built path
)

// testdataBin builds testdata/<name> static, once per test binary, and
// returns its path.
func testdataBin(t testing.TB, name string) string {
	t.Helper()
	testBinMu.Lock()
	defer testBinMu.Unlock()
	if p, ok := testBins[name]; ok {
		return p
	}
	dir, err := os.MkdirTemp("", "chalk-testdata-")
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", out, "./testdata/"+name)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build testdata/%s: %v\n%s", name, err, b)
	}
	testBins[name] = out
	return out
}

// netprobe is testdata/netprobe (busybox has no UDP tools).
func netprobe(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(testdataBin(t, "netprobe"))
	if err != nil {
		t.Fatal(err)
	}
	return b
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

// skipTunnelsOnGVisor: on a gVisor node a sandbox with tunnels is refused
// at create, with the reason; the rest of a tunnel test does not apply.
func skipTunnelsOnGVisor(t *testing.T, n *chalktest.Node, c *chalkcompute.Client) {
	t.Helper()
	if !onGVisor(n) {
		return
	}
	_, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"), chalkcompute.WithTunnels("mesh"))
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "gVisor") {
		t.Fatalf("sandbox with a tunnel on a gVisor node: %v, want a failed precondition naming gVisor", err)
	}
	t.Skip("tunnels are not available on gVisor nodes (refused at create, checked above)")
}

// TestTunnel: sandboxes in a tunnel reach each other over WireGuard on TCP and
// UDP; a sandbox outside cannot; a member cannot spoof another member's
// address; the private key is nowhere in the sandbox; a member that leaves
// is gone from the others' peers; the metadata service lists the members.
func TestTunnel(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	skipTunnelsOnGVisor(t, n, c)
	ctx := ctxT(t, 5*time.Minute)
	// a and b are pre-started sandboxes claimed (the tunnel device is added
	// after start either way); m is whatever the node has ready by then.
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(2)); err != nil {
		t.Fatal(err)
	}
	pre := counter(t, n, "chalk_sandbox_starts_prestarted_total")
	a := create(t, c, chalkcompute.WithTunnels("mesh"))
	b := create(t, c, chalkcompute.WithTunnels("mesh"))
	if got := counter(t, n, "chalk_sandbox_starts_prestarted_total"); got != pre+2 {
		t.Fatalf("tunnel members did not claim pre-started sandboxes (%v -> %v)", pre, got)
	}
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
	local := counter(t, n, "chalk_tunnel_local_packets_total")
	if out := mustExec(t, a, "netprobe", "tcp", bAddr, "hello-tcp"); out != "echo hello-tcp\n" {
		t.Fatalf("TCP over the tunnel: %q", out)
	}
	if out := mustExec(t, a, "netprobe", "udp", bAddr, "hello-udp"); out != "echo hello-udp\n" {
		t.Fatalf("UDP over the tunnel: %q", out)
	}
	// Members on one node are joined locally, through the tunnel's router
	// namespace (a TCP exchange and a UDP one are at least 6 packets each
	// way), and a bulk transfer's TCP segments go whole (TSO).
	if got := counter(t, n, "chalk_tunnel_local_packets_total"); got < local+6 {
		t.Fatalf("local tunnel packets %v -> %v: the members' traffic did not take the local path", local, got)
	}
	var sink outputWatch
	sinkReady := sink.until("ready")
	if _, err := b.Start(ctx, []string{"netprobe", "sink", "7002"}, chalkcompute.Stdout(&sink)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sinkReady:
	case <-ctx.Done():
		t.Fatalf("sink not ready: %q", sink.String())
	}
	segs := counter(t, n, "chalk_tunnel_local_segments_total")
	if out := mustExec(t, a, "netprobe", "blast", addr[b.ID()]+":7002", "16"); !strings.HasPrefix(out, "gbit/s ") {
		t.Fatalf("16 MiB over the tunnel: %q", out)
	}
	if got := counter(t, n, "chalk_tunnel_local_segments_total"); got <= segs {
		t.Fatalf("no TCP segment over the MTU went whole between members (%v -> %v): TSO is off", segs, got)
	}
	// Members have DNS names, which only members resolve.
	bName := b.ID() + ".mesh.tunnel.internal"
	if out := mustExec(t, a, "netprobe", "tcp", bName+":7000", "hello-dns"); out != "echo hello-dns\n" {
		t.Fatalf("TCP to %s: %q", bName, out)
	}
	if res, err := x.Exec(ctx, []string{"nslookup", bName}); err != nil || res.Code == 0 || strings.Contains(string(res.Stdout), addr[b.ID()]) {
		t.Fatalf("a sandbox outside the tunnel resolved %s: %v %+v", bName, err, res)
	}
	if res, err := a.Exec(ctx, []string{"nslookup", "sb-nonexistent.mesh.tunnel.internal"}); err != nil || res.Code == 0 {
		t.Fatalf("unknown member resolved: %v %+v", err, res)
	}
	// The sandbox outside the tunnel has no way to the tunnel addresses.
	if res, err := x.Exec(ctx, []string{"netprobe", "tcp-once", bAddr, "intruder"}); err != nil || res.Code == 0 {
		t.Fatalf("sandbox outside the tunnel reached it: %v %+v", err, res)
	}
	// a tries to send one datagram claiming m's address (IP_FREEBIND needs
	// no privilege), then one of its own: the first must not arrive. Without
	// CAP_NET_RAW or CAP_NET_ADMIN the sandbox cannot even send it (sendto
	// fails: no route from a foreign source); were it sent, the router's
	// source check would drop it (tunnel.TestKernelLocalPath sends one as
	// root; tunnel.TestLocalPath on the TUN path).
	if res, err := a.Exec(ctx, []string{"netprobe", "udp-from", addr[m.ID()], bAddr, "spoofed"}); err != nil || res.Code == 0 || !strings.Contains(string(res.Stderr), "network is unreachable") {
		t.Fatalf("a sandbox sending from another member's address: %v %+v, want sendto to fail (network is unreachable)", err, res)
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
	// wg0 is a multi-queue TUN: whoever opens /dev/net/tun in the sandbox's
	// namespace could attach a queue to it. There is no such node, and none
	// can be made (no CAP_MKNOD).
	if res, _ := a.Exec(ctx, []string{"sh", "-c", "test -e /dev/net/tun && exit 0; mkdir -p /tmp/net && mknod /tmp/net/tun c 10 200"}); res == nil || res.Code == 0 {
		t.Fatalf("the sandbox has or made a TUN device node: %+v", res)
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

// TestTunnelExternalPeer: an on-prem WireGuard peer in the fake internet
// (wireguard-go configured from the wg-quick file the API returns) and a
// sandbox reach each other's services, even under a deny-all egress policy
// (tunnel traffic leaves the node only as WireGuard UDP); a sandbox of
// another tunnel reaches neither; removing the peer cuts it off.
func TestTunnelExternalPeer(t *testing.T) {
	inet := chalktest.NewFakeInternet(t)
	n := chalktest.StartWith(t, inet)
	c := n.Client()
	skipTunnelsOnGVisor(t, n, c)
	ctx := ctxT(t, 5*time.Minute)
	if _, err := c.CreatePolicy(ctx, chalkcompute.NetworkPolicy{Name: "deny-all", AllowAll: chalkcompute.Bool(false)}); err != nil {
		t.Fatal(err)
	}
	a := create(t, c, chalkcompute.WithTunnels("ext"), chalkcompute.WithNetworkPolicyNames("deny-all"))
	o := create(t, c, chalkcompute.WithTunnels("other"))
	for _, sb := range []*chalkcompute.Sandbox{a, o} {
		withProbe(t, sb)
	}
	tun, err := c.Tunnel(ctx, "ext")
	if err != nil || len(tun.Members) != 1 {
		t.Fatalf("tunnel: %+v %v", tun, err)
	}
	aAddr := tun.Members[0].Address
	peerAddr := netip.MustParsePrefix(tun.Subnet).Addr().As4()
	peerAddr[3] = 200
	peerIP := netip.AddrFrom4(peerAddr).String()

	priv, err := tunnel.NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	pub := priv.PublicKey().String()
	// Bad peers are refused, naming the problem.
	for _, bad := range []chalkcompute.TunnelPeer{
		{PublicKey: "not-a-key", AllowedIPs: []string{peerIP + "/32"}},
		{PublicKey: pub, AllowedIPs: []string{"0.0.0.0/0"}},
		{PublicKey: pub, AllowedIPs: []string{aAddr + "/32"}},
		{PublicKey: pub, AllowedIPs: []string{"169.254.169.254/32"}},
		{PublicKey: pub, AllowedIPs: []string{tun.Subnet}},
	} {
		if _, err := c.AddTunnelPeer(ctx, "ext", bad); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("peer %+v: %v, want InvalidArgument", bad, err)
		}
	}
	p, err := c.AddTunnelPeer(ctx, "ext", chalkcompute.TunnelPeer{PublicKey: pub, AllowedIPs: []string{peerIP + "/32"}, Endpoint: "203.0.113.1:51900"})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Address = " + peerIP + "/32", "ListenPort = 51900", "PublicKey = " + tun.Members[0].PublicKey, "AllowedIPs = " + aAddr + "/32", "Endpoint = 203.0.113.2:"} {
		if !strings.Contains(p.Config, want) {
			t.Fatalf("wg-quick config lacks %q:\n%s", want, p.Config)
		}
	}
	if strings.Contains(p.Config, priv.String()) {
		t.Fatal("the config holds the peer's private key")
	}
	// The CLI lists the peer.
	if out, stderr, code := n.CLI("compute", "tunnel", "peer", "ls", "ext", "--output", "json"); code != 0 || !strings.Contains(out, pub) || !strings.Contains(out, "[Interface]") {
		t.Fatalf("tunnel peer ls: %d %q %q", code, out, stderr)
	}
	// The external peer comes up in the fake internet.
	inNet := startWGPeer(t, inet, priv.String(), p.Config)
	probe := testdataBin(t, "netprobe")

	// Peer -> sandbox.
	var served outputWatch
	ready := served.until("ready")
	srv, err := a.Start(ctx, []string{"netprobe", "serve", "7000"}, chalkcompute.Stdout(&served), chalkcompute.Stderr(&served))
	if err != nil {
		t.Fatal(err)
	}
	<-ready
	if out, err := inNet(probe, "tcp", aAddr+":7000", "from-onprem").CombinedOutput(); err != nil || string(out) != "echo from-onprem\n" {
		t.Fatalf("peer -> sandbox: %q %v", out, err)
	}
	// Sandbox -> peer, TCP and UDP, though a's egress policy denies everything.
	servePeer(t, inNet, probe, "7001")
	// Tunnel names resolve under the deny-all policy too (and never go upstream).
	if out := mustExec(t, a, "nslookup", a.ID()+".ext.tunnel.internal"); !strings.Contains(out, aAddr) {
		t.Fatalf("own tunnel name under deny-all: %q", out)
	}
	if out := mustExec(t, a, "netprobe", "tcp", peerIP+":7001", "to-onprem"); out != "echo to-onprem\n" {
		t.Fatalf("sandbox -> peer TCP: %q", out)
	}
	if out := mustExec(t, a, "netprobe", "udp", peerIP+":7001", "to-onprem-udp"); out != "echo to-onprem-udp\n" {
		t.Fatalf("sandbox -> peer UDP: %q", out)
	}
	// ...while the policy still holds for its normal egress.
	if res, err := a.Exec(ctx, []string{"netprobe", "tcp-once", "203.0.113.1:7001", "direct"}); err != nil || res.Code == 0 {
		t.Fatalf("deny-all sandbox reached the internet directly: %v %+v", err, res)
	}
	// A sandbox of another tunnel reaches neither the member nor the peer.
	for _, dst := range []string{aAddr + ":7000", peerIP + ":7001"} {
		if res, err := o.Exec(ctx, []string{"netprobe", "tcp-once", dst, "cross"}); err != nil || res.Code == 0 {
			t.Fatalf("sandbox of tunnel other reached %s: %v %+v", dst, err, res)
		}
	}
	// Removing the peer cuts it off both ways.
	if err := c.RemoveTunnelPeer(ctx, "ext", pub); err != nil {
		t.Fatal(err)
	}
	if out, err := inNet(probe, "tcp-once", aAddr+":7000", "after-removal").CombinedOutput(); err == nil {
		t.Fatalf("removed peer still reaches the sandbox: %q", out)
	}
	if res, err := a.Exec(ctx, []string{"netprobe", "tcp-once", peerIP + ":7001", "after-removal"}); err != nil || res.Code == 0 {
		t.Fatalf("sandbox still reaches the removed peer: %v %+v", err, res)
	}
	if tun, err := c.Tunnel(ctx, "ext"); err != nil || len(tun.Peers) != 0 {
		t.Fatalf("after removal: %+v %v", tun, err)
	}
	if err := c.RemoveTunnelPeer(ctx, "ext", pub); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("remove an absent peer: %v", err)
	}
	if _, err := a.Exec(ctx, []string{"netprobe", "udp", "127.0.0.1:7000", "quit"}); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Wait(); err != nil {
		t.Fatal(err)
	}
}

// startWGPeer brings up an external WireGuard peer (testdata/wgpeer,
// wireguard-go on a TUN device) in the fake internet with the private key
// and the wg-quick config a tunnel gave it, and returns how to run a
// command in the fake internet's network namespace.
func startWGPeer(t *testing.T, inet *chalktest.FakeInternet, key, config string) func(argv ...string) *exec.Cmd {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), "wg-ext.conf")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	inNet := func(argv ...string) *exec.Cmd {
		return exec.Command("ip", append([]string{"netns", "exec", inet.Netns}, argv...)...)
	}
	wg := inNet(testdataBin(t, "wgpeer"), "-key", key, cfg)
	stdin, _ := wg.StdinPipe()
	stdout, _ := wg.StdoutPipe()
	var wgErr strings.Builder
	wg.Stderr = &wgErr
	if err := wg.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); _ = wg.Wait() })
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("wgpeer: %q %v %s", line, err, wgErr.String())
	}
	return inNet
}

// servePeer starts netprobe's TCP and UDP echo server (probe) on port
// through inNet and returns once it listens.
func servePeer(t *testing.T, inNet func(argv ...string) *exec.Cmd, probe, port string) {
	t.Helper()
	psrv := inNet(probe, "serve", port)
	pout, _ := psrv.StdoutPipe()
	if err := psrv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = psrv.Process.Kill(); _ = psrv.Wait() })
	if line, err := bufio.NewReader(pout).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("peer's server: %q %v", line, err)
	}
	go func() { _, _ = io.Copy(io.Discard, pout) }()
}

// TestTunnelRestart: members on one node are joined through the tunnel's
// router (wg0-local in each), and after chalkd is killed (-9) and restarted
// they are joined again the same way (the old router went with the old
// chalkd; each member has one wg0-local, not a leftover beside a new one)
// and reach each other; a member that ends is no longer routed through the
// router by the other.
func TestTunnelRestart(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	skipTunnelsOnGVisor(t, n, c)
	ctx := ctxT(t, 5*time.Minute)
	a := create(t, c, chalkcompute.WithTunnels("mesh"))
	b := create(t, c, chalkcompute.WithTunnels("mesh"))
	withProbe(t, a)
	withProbe(t, b)
	exchange := func(a, b *chalkcompute.Sandbox, msg string) {
		t.Helper()
		tun, err := c.Tunnel(ctx, "mesh")
		if err != nil {
			t.Fatal(err)
		}
		var bAddr string
		for _, mb := range tun.Members {
			if mb.SandboxID == b.ID() {
				bAddr = mb.Address
			}
		}
		if bAddr == "" {
			t.Fatalf("b is not a member: %+v", tun)
		}
		if l := mustExec(t, a, "ip", "-o", "link", "show"); strings.Count(l, "wg0-local") != 1 {
			t.Fatalf("links of a: %q, want one wg0-local", l)
		}
		if r := mustExec(t, a, "ip", "route", "get", bAddr); !strings.Contains(r, "dev wg0-local") {
			t.Fatalf("a's route to b: %q, want through wg0-local", r)
		}
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
		local := counter(t, n, "chalk_tunnel_local_packets_total")
		if out := mustExec(t, a, "netprobe", "tcp", bAddr+":7000", msg); out != "echo "+msg+"\n" {
			t.Fatalf("TCP over the tunnel: %q", out)
		}
		if got := counter(t, n, "chalk_tunnel_local_packets_total"); got < local+6 {
			t.Fatalf("local tunnel packets %v -> %v", local, got)
		}
		if _, err := a.Exec(ctx, []string{"netprobe", "udp", bAddr + ":7000", "quit"}); err != nil {
			t.Fatal(err)
		}
		if _, err := srv.Wait(); err != nil {
			t.Fatal(err)
		}
	}
	exchange(a, b, "before")
	n.Kill()
	n.Restart()
	c = n.Client()
	var err error
	if a, err = c.Sandbox(ctx, a.ID()); err != nil {
		t.Fatal(err)
	}
	if b, err = c.Sandbox(ctx, b.ID()); err != nil {
		t.Fatal(err)
	}
	exchange(a, b, "after")
	if _, err := b.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	if r := mustExec(t, a, "ip", "route"); strings.Contains(r, "wg0-local") {
		t.Fatalf("a still routes through the router with no other member: %q", r)
	}
}
