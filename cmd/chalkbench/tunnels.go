package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

// tunnelBench measures WireGuard tunnels: the time from creating a second
// member to its first packet through the tunnel, and TCP throughput between
// two members beside the same transfer over a bare veth pair between two
// network namespaces (the kernel's path without WireGuard or chalkcompute).
func tunnelBench(ctx context.Context, c *chalkcompute.Client, work string, n int) {
	probePath := filepath.Join(work, "netprobe")
	build := exec.Command("go", "build", "-o", probePath, "./daemon/testdata/netprobe")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fail(fmt.Errorf("build netprobe: %v: %s", err, out))
	}
	probe, err := os.ReadFile(probePath)
	if err != nil {
		fail(err)
	}
	name := "bench-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	defer func() { _ = c.DeleteTunnel(ctx, name) }()
	member := func() *chalkcompute.Sandbox {
		sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithTunnels(name), chalkcompute.WithTimeout(30*time.Minute))
		if err != nil {
			fail(err)
		}
		return sb
	}
	a := member()
	defer a.Terminate(ctx)
	if err := a.WriteFile(ctx, "/bin/netprobe", probe, 0o755); err != nil {
		fail(err)
	}
	for _, argv := range [][]string{{"netprobe", "serve", "7000"}, {"netprobe", "sink", "5001"}} {
		pr, pw := io.Pipe()
		if _, err := a.Start(ctx, argv, chalkcompute.Stdout(pw)); err != nil {
			fail(err)
		}
		waitReady(pr)
	}
	tun, err := c.Tunnel(ctx, name)
	if err != nil || len(tun.Members) != 1 {
		fail(fmt.Errorf("tunnel %s: %+v %v", name, tun, err))
	}
	aAddr := tun.Members[0].Address

	// Create a member, then its first TCP exchange with a (busybox nc).
	var total, after []time.Duration
	for i := range max(n/2, 5) + 1 {
		t0 := time.Now()
		b := member()
		t1 := time.Now()
		res, err := b.Exec(ctx, []string{"sh", "-c", "echo hi | nc " + aAddr + " 7000"})
		t2 := time.Now()
		if err == nil && string(res.Stdout) != "echo hi\n" {
			err = fmt.Errorf("first exchange over the tunnel: %q %q", res.Stdout, res.Stderr)
		}
		if err != nil {
			fail(err)
		}
		_, _ = b.Terminate(ctx)
		if i > 0 {
			total, after = append(total, t2.Sub(t0)), append(after, t2.Sub(t1))
		}
	}
	sortDurations(total)
	sortDurations(after)
	fmt.Println("tunnel: from creating a second member to its first TCP exchange with the first")
	fmt.Printf("  %-22s median %9s  p90 %9s\n", "create + exchange", median(total).Round(10*time.Microsecond), p90(total).Round(10*time.Microsecond))
	fmt.Printf("  %-22s median %9s  p90 %9s\n", "exchange after create", median(after).Round(10*time.Microsecond), p90(after).Round(10*time.Microsecond))
	fmt.Printf("goal: first packet <= 100ms after the member exists: %s\n", verdict(median(after) <= 100*time.Millisecond))

	// Throughput, 3 runs of 512 MiB each.
	b := member()
	defer b.Terminate(ctx)
	if err := b.WriteFile(ctx, "/bin/netprobe", probe, 0o755); err != nil {
		fail(err)
	}
	// Tunnel and veth transfers alternate, so each pair sees about the same
	// load from whatever else runs on the machine; the ratio is the median
	// of the pairs'.
	vethBlast, vethDone, vethErr := vethPair(probePath)
	defer vethDone()
	var tunnelGbps, vethGbps, ratios []float64
	for range 5 {
		res, err := b.Exec(ctx, []string{"netprobe", "blast", aAddr + ":5001", "512"})
		if err != nil || res.Code != 0 {
			fail(fmt.Errorf("blast over the tunnel: %v %s", err, res.Stderr))
		}
		tunnelGbps = append(tunnelGbps, parseGbps(string(res.Stdout)))
		if vethErr == nil {
			var v float64
			if v, vethErr = vethBlast(); vethErr == nil {
				vethGbps = append(vethGbps, v)
				ratios = append(ratios, tunnelGbps[len(tunnelGbps)-1]/v)
			}
		}
	}
	sort.Float64s(tunnelGbps)
	fmt.Println("tunnel: TCP throughput between two members (512 MiB, median of 5, alternating with the veth)")
	fmt.Printf("  %-22s %7.2f Gbit/s", "over the tunnel", tunnelGbps[2])
	if vethErr != nil {
		fmt.Printf("\n  %-22s n/a (%v)\n", "bare veth pair", vethErr)
	} else {
		sort.Float64s(vethGbps)
		sort.Float64s(ratios)
		fmt.Printf("  (%.2fx the bare veth)\n  %-22s %7.2f Gbit/s\n", ratios[2], "bare veth pair", vethGbps[2])
	}
	fmt.Printf("goal: >= 0.5x the bare veth: %s\n\n", verdict(vethErr == nil && ratios[2] >= 0.5))
}

func sortDurations(ds []time.Duration) { sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] }) }

// waitReady reads r until netprobe's "ready" line, then drains it.
func waitReady(r io.Reader) {
	br := bufio.NewReader(r)
	line, err := br.ReadString('\n')
	if err != nil || line != "ready\n" {
		fail(fmt.Errorf("netprobe: %q %v", line, err))
	}
	go func() { _, _ = io.Copy(io.Discard, br) }()
}

func parseGbps(out string) float64 {
	f, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(out), "gbit/s")), 64)
	if err != nil {
		fail(fmt.Errorf("netprobe blast: %q", out))
	}
	return f
}

// vethPair sets up two network namespaces joined by a veth pair with a
// sink in one; blast sends 512 MiB to it from the other.
func vethPair(probe string) (blast func() (float64, error), done func(), err error) {
	id := strconv.FormatInt(time.Now().UnixNano()%1e6, 36)
	nsA, nsB := "cbench-a"+id, "cbench-b"+id
	var undo []func()
	done = func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	for _, ns := range []string{nsA, nsB} {
		if err := run("ip", "netns", "add", ns); err != nil {
			return nil, done, err
		}
		undo = append(undo, func() { _ = run("ip", "netns", "del", ns) })
	}
	for _, argv := range [][]string{
		{"ip", "link", "add", "cbv0" + id, "netns", nsA, "type", "veth", "peer", "name", "cbv1" + id, "netns", nsB},
		{"ip", "-n", nsA, "addr", "add", "10.254.77.1/30", "dev", "cbv0" + id},
		{"ip", "-n", nsB, "addr", "add", "10.254.77.2/30", "dev", "cbv1" + id},
		{"ip", "-n", nsA, "link", "set", "cbv0" + id, "up"},
		{"ip", "-n", nsB, "link", "set", "cbv1" + id, "up"},
	} {
		if err := run(argv...); err != nil {
			return nil, done, err
		}
	}
	srv := exec.Command("ip", "netns", "exec", nsA, probe, "sink", "5001")
	out, err := srv.StdoutPipe()
	if err != nil {
		return nil, done, err
	}
	if err := srv.Start(); err != nil {
		return nil, done, err
	}
	undo = append(undo, func() { _ = srv.Process.Kill(); _ = srv.Wait() })
	waitReady(out)
	return func() (float64, error) {
		b, err := exec.Command("ip", "netns", "exec", nsB, probe, "blast", "10.254.77.1:5001", "512").Output()
		if err != nil {
			return 0, err
		}
		return parseGbps(string(b)), nil
	}, done, nil
}
