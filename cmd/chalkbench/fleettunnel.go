package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// fleetTunnelBench measures TCP throughput between tunnel members on two
// fleet nodes (WireGuard from member to member, the nodes' namespaces
// routed through the control plane's) beside, in the same run and
// alternating, two members on one node (the local path, TUN to TUN) and a
// bare veth pair (the kernel's path alone).
func fleetTunnelBench(ctx context.Context) {
	h := &harness{}
	defer h.close()
	atFail = h.close
	defer func() { atFail = nil }()
	defer func() {
		if r := recover(); r != nil {
			s, ok := r.(harnessStop)
			if !ok {
				panic(r)
			}
			if s.skip {
				fmt.Printf("fleet tunnel: skipped (%s)\n\n", s.msg)
				return
			}
			fail(fmt.Errorf("fleet tunnel: %s", s.msg))
		}
	}()
	useTreeBin()
	probePath := filepath.Join(h.TempDir(), "netprobe")
	build := exec.Command("go", "build", "-o", probePath, "./daemon/testdata/netprobe")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		h.Fatalf("build netprobe: %v: %s", err, out)
	}
	probe, err := os.ReadFile(probePath)
	if err != nil {
		h.Fatal(err)
	}

	control := chalktest.StartControl(h)
	n1 := chalktest.StartFleetNode(h, control, 1)
	n2 := chalktest.StartFleetNode(h, control, 2)
	for i, n := range []*chalktest.Node{n1, n2} {
		if out, err := exec.Command("ip", "-n", n.Netns, "route", "add", fmt.Sprintf("10.251.%d.0/30", 2-i), "via", chalktest.ControlAddr(i+1)).CombinedOutput(); err != nil {
			h.Fatalf("route between the nodes: %v %s", err, out)
		}
	}
	waitNodes(h, control, "node1", "node2")
	c := control.Client()
	// on creates a member on the named node (the other cordoned meanwhile).
	on := func(node, other string) *chalkcompute.Sandbox {
		cli := func(cmd string) {
			if _, errOut, code := control.CLI("admin", "node", cmd, other); code != 0 {
				h.Fatalf("%s %s: %s", cmd, other, errOut)
			}
		}
		cli("cordon")
		defer cli("uncordon")
		sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithTunnels("bench"), chalkcompute.WithTimeout(30*time.Minute))
		if err != nil {
			h.Fatalf("create on %s: %v", node, err)
		}
		if err := sb.WriteFile(ctx, "/bin/netprobe", probe, 0o755); err != nil {
			h.Fatal(err)
		}
		return sb
	}
	a := on("node1", "node2")
	defer a.Terminate(ctx)
	local := on("node1", "node2")
	defer local.Terminate(ctx)
	remote := on("node2", "node1")
	defer remote.Terminate(ctx)
	if _, err := a.Start(ctx, []string{"netprobe", "sink", "5001"}); err != nil {
		h.Fatal(err)
	}
	tun, err := c.Tunnel(ctx, "bench")
	if err != nil {
		h.Fatal(err)
	}
	var aAddr string
	for _, m := range tun.Members {
		if m.SandboxID == a.ID() {
			aAddr = m.Address
		}
	}
	blast := func(from *chalkcompute.Sandbox) float64 {
		// The sink may take a moment to listen: the first blast retries.
		for try := 0; ; try++ {
			res, err := from.Exec(ctx, []string{"netprobe", "blast", aAddr + ":5001", "512"})
			if err == nil && res.Code == 0 {
				return parseGbps(string(res.Stdout))
			}
			if try == 20 {
				h.Fatalf("blast over the tunnel: %v %+v", err, res)
			}
			time.Sleep(100 * time.Millisecond) // waiting for the sink in another process
		}
	}
	vethBlast, vethDone, vethErr := vethPair(probePath)
	defer vethDone()
	var cross, same, veth, crossR, sameR []float64
	for range 5 {
		x, s := blast(remote), blast(local)
		cross, same = append(cross, x), append(same, s)
		if vethErr == nil {
			var v float64
			if v, vethErr = vethBlast(); vethErr == nil {
				veth = append(veth, v)
				crossR, sameR = append(crossR, x/v), append(sameR, s/v)
			}
		}
	}
	for _, s := range [][]float64{cross, same, veth, crossR, sameR} {
		sort.Float64s(s)
	}
	fmt.Println("fleet tunnel: TCP throughput to a member on node 1 (512 MiB, median of 5; the three transfers alternate)")
	if vethErr != nil {
		fmt.Printf("  %-32s %7.2f Gbit/s\n  %-32s %7.2f Gbit/s\n  bare veth pair: n/a (%v)\n\n", "from node 2 (WireGuard)", cross[2], "from node 1 (local path)", same[2], vethErr)
		return
	}
	fmt.Printf("  %-32s %7.2f Gbit/s  (%.2fx the bare veth, %.2fx the local path)\n", "from node 2 (WireGuard)", cross[2], crossR[2], cross[2]/same[2])
	fmt.Printf("  %-32s %7.2f Gbit/s  (%.2fx the bare veth)\n", "from node 1 (local path)", same[2], sameR[2])
	fmt.Printf("  %-32s %7.2f Gbit/s\n\n", "bare veth pair", veth[2])
}
