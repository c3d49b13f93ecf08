package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

type mcpBenchResult struct {
	MedianUS    float64 `json:"median_us"`
	P90US       float64 `json:"p90_us"`
	CallsPerSec float64 `json:"calls_per_sec"`
	Calls       int64   `json:"calls"` // tools/call made in all (sequential and concurrent)
	// CPU time per call, over the whole measurement: chalkd's and the
	// upstream's (-1: unknown).
	ChalkdCPU, UpstreamCPU time.Duration
	// ChalkdIO is chalkd's read and write system calls per call
	// (/proc/PID/io syscr + syscw; -1: unknown).
	ChalkdIO float64
	// ClientUS is the client's (mcpprobe's) CPU time per call of its
	// concurrent sessions, in microseconds.
	ClientUS float64 `json:"client_cpu_us"`
	// Busy is the machine's busy CPU time (every process, /proc/stat) per
	// call: what bounds throughput when the cores are full.
	Busy time.Duration
}

// mcpBench measures the MCP gateway: a tools/call from inside a sandbox
// through the gateway beside the same call straight to the upstream (both
// with the official Go SDK's client), latency of sequential calls and
// throughput of 8 concurrent sessions. The upstream (the official SDK's
// server) runs in a network namespace of its own, which the sandbox reaches
// through its normal egress and chalkd directly.
// upstreamNetns is the network namespace of the chalkd measured ("": the
// host's).
var upstreamNetns string

func mcpBench(ctx context.Context, c *chalkcompute.Client, work string, n int, pidFile string) {
	probe := filepath.Join(work, "mcpprobe")
	build := exec.Command("go", "build", "-o", probe, "./daemon/testdata/mcpprobe")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fail(fmt.Errorf("build mcpprobe: %v: %s", err, out))
	}
	id := strconv.FormatInt(time.Now().UnixNano()%1e6, 36)
	ns, hostIf := "cbench-mcp"+id, "cbm0"+id
	if err := run("ip", "netns", "add", ns); err != nil {
		fail(err)
	}
	defer run("ip", "netns", "del", ns)
	// The upstream's link ends in chalkd's network namespace: the host's,
	// or that of a chalkd started with -own.
	at := []string{"ip"}
	if upstreamNetns != "" {
		at = append(at, "-n", upstreamNetns)
	}
	at = at[:len(at):len(at)] // each append below copies
	for _, argv := range [][]string{
		append(at, "link", "add", hostIf, "type", "veth", "peer", "name", "cbm1"+id, "netns", ns),
		append(at, "addr", "add", "10.254.88.1/30", "dev", hostIf),
		append(at, "link", "set", hostIf, "up"),
		{"ip", "-n", ns, "addr", "add", "10.254.88.2/30", "dev", "cbm1" + id},
		{"ip", "-n", ns, "link", "set", "cbm1" + id, "up"},
		{"ip", "-n", ns, "link", "set", "lo", "up"},
		{"ip", "-n", ns, "route", "add", "default", "via", "10.254.88.1"},
	} {
		if err := run(argv...); err != nil {
			fail(err)
		}
	}
	up := exec.Command("ip", "netns", "exec", ns, probe, "upstream", "10.254.88.2:8080")
	out, err := up.StdoutPipe()
	if err != nil {
		fail(err)
	}
	if err := up.Start(); err != nil {
		fail(err)
	}
	defer func() { _ = up.Process.Kill(); _ = up.Wait() }()
	waitReady(out)
	name := "bench-" + id
	srv, err := c.AddMCPServer(ctx, chalkcompute.MCPServer{Name: name, URL: "http://10.254.88.2:8080/", Credential: "bench-credential", RatePerSecond: 1e6})
	if err != nil {
		fail(err)
	}
	defer c.RemoveMCPServer(ctx, name)
	// The direct path: the upstream's private address is blocked for every
	// sandbox unless a policy allows a CIDR inside the range.
	pol := "bench-mcp-" + id
	if _, err := c.CreatePolicy(ctx, chalkcompute.NetworkPolicy{Name: pol, AllowedHostnames: []string{"10.254.88.2/32"}}); err != nil {
		fail(err)
	}
	defer c.DeletePolicy(ctx, pol)
	sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithTimeout(30*time.Minute), chalkcompute.WithNetworkPolicyNames(pol))
	if err != nil {
		fail(err)
	}
	defer sb.Terminate(ctx)
	b, err := os.ReadFile(probe)
	if err != nil {
		fail(err)
	}
	if err := sb.WriteFile(ctx, "/bin/mcpprobe", b, 0o755); err != nil {
		fail(err)
	}
	chalkdPid := ""
	if b, err := os.ReadFile(pidFile); err == nil {
		chalkdPid = strings.TrimSpace(string(b))
	}
	upPid := strconv.Itoa(up.Process.Pid) // ip netns exec execs the probe
	calls := strconv.Itoa(max(n*20, 200))
	measure := func(url, aud string) mcpBenchResult {
		chalkd0, up0, io0, busy0 := procCPU(chalkdPid), procCPU(upPid), procIO(chalkdPid), machineBusy()
		res, err := sb.Exec(ctx, []string{"mcpprobe", "bench", url, aud, calls, "8", "3"})
		if err != nil || res.Code != 0 {
			fail(fmt.Errorf("mcpprobe bench %s: %v %s", url, err, res.Stderr))
		}
		var r mcpBenchResult
		if err := json.Unmarshal(res.Stdout, &r); err != nil {
			fail(fmt.Errorf("mcpprobe bench: %q", res.Stdout))
		}
		chalkd1, up1, io1, busy1 := procCPU(chalkdPid), procCPU(upPid), procIO(chalkdPid), machineBusy()
		r.ChalkdCPU, r.UpstreamCPU, r.ChalkdIO, r.Busy = -1, -1, -1, -1
		if busy0 >= 0 && busy1 >= 0 && r.Calls > 0 {
			r.Busy = (busy1 - busy0) / time.Duration(r.Calls)
		}
		if io0 >= 0 && io1 >= 0 && r.Calls > 0 {
			r.ChalkdIO = float64(io1-io0) / float64(r.Calls)
		}
		if chalkd0 >= 0 && chalkd1 >= 0 && r.Calls > 0 {
			r.ChalkdCPU = (chalkd1 - chalkd0) / time.Duration(r.Calls)
		}
		if up0 >= 0 && up1 >= 0 && r.Calls > 0 {
			r.UpstreamCPU = (up1 - up0) / time.Duration(r.Calls)
		}
		return r
	}
	// Rounds alternate between the two paths, so that both see the same
	// load on a shared machine; each figure is the median of its rounds.
	var ds, gs []mcpBenchResult
	for range 3 {
		ds = append(ds, measure("http://10.254.88.2:8080/", "-"))
		gs = append(gs, measure(srv.GatewayURL, srv.GatewayURL))
	}
	direct, gw := medianResult(ds), medianResult(gs)
	added := (gw.MedianUS - direct.MedianUS) / 1000
	fmt.Println("MCP gateway: tools/call from a sandbox (official Go SDK client and server; medians of 3 alternating rounds)")
	fmt.Printf("  %-22s median %7.2fms  p90 %7.2fms  %8.0f calls/s (8 sessions)\n", "through the gateway", gw.MedianUS/1000, gw.P90US/1000, gw.CallsPerSec)
	fmt.Printf("  %-22s median %7.2fms  p90 %7.2fms  %8.0f calls/s (8 sessions)\n", "direct to upstream", direct.MedianUS/1000, direct.P90US/1000, direct.CallsPerSec)
	fmt.Printf("  CPU per call: chalkd %.3fms through the gateway (%.3fms while direct); the upstream %.3fms / %.3fms; chalkd's reads+writes %.1f\n",
		ms(gw.ChalkdCPU), ms(direct.ChalkdCPU), ms(gw.UpstreamCPU), ms(direct.UpstreamCPU), gw.ChalkdIO)
	fmt.Printf("  the client %.3fms / %.3fms; the machine's busy CPU (every process) %.3fms / %.3fms\n",
		gw.ClientUS/1000, direct.ClientUS/1000, ms(gw.Busy), ms(direct.Busy))
	fmt.Printf("  added latency %.2fms (%.2fx direct); throughput %.2fx direct\n", added, gw.MedianUS/direct.MedianUS, gw.CallsPerSec/direct.CallsPerSec)
	fmt.Printf("goal (issue #18): added median <= 0.5ms: %s; throughput >= 0.8x direct: %s\n\n", verdict(added <= 0.5), verdict(gw.CallsPerSec >= 0.8*direct.CallsPerSec))
}

// medianResult is each figure's median over rounds.
func medianResult(rs []mcpBenchResult) mcpBenchResult {
	med := func(f func(mcpBenchResult) float64) float64 {
		xs := make([]float64, 0, len(rs))
		for _, r := range rs {
			xs = append(xs, f(r))
		}
		slices.Sort(xs)
		return xs[len(xs)/2]
	}
	return mcpBenchResult{
		MedianUS:    med(func(r mcpBenchResult) float64 { return r.MedianUS }),
		P90US:       med(func(r mcpBenchResult) float64 { return r.P90US }),
		CallsPerSec: med(func(r mcpBenchResult) float64 { return r.CallsPerSec }),
		ChalkdCPU:   time.Duration(med(func(r mcpBenchResult) float64 { return float64(r.ChalkdCPU) })),
		UpstreamCPU: time.Duration(med(func(r mcpBenchResult) float64 { return float64(r.UpstreamCPU) })),
		ChalkdIO:    med(func(r mcpBenchResult) float64 { return r.ChalkdIO }),
		ClientUS:    med(func(r mcpBenchResult) float64 { return r.ClientUS }),
		Busy:        time.Duration(med(func(r mcpBenchResult) float64 { return float64(r.Busy) })),
	}
}

// machineBusy is the machine's CPU time spent not idle so far, over all
// cores (/proc/stat: every field but idle and iowait); -1 if unknown.
func machineBusy() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return -1
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return -1
	}
	var ticks int64
	for i, s := range f[1:8] { // user nice system idle iowait irq softirq
		if i == 3 || i == 4 {
			continue
		}
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return -1
		}
		ticks += v
	}
	return time.Duration(ticks) * time.Second / 100 // USER_HZ
}

// procIO is process pid's read and write system calls so far (/proc/PID/io
// syscr + syscw); -1 if unknown.
func procIO(pid string) int64 {
	if pid == "" {
		return -1
	}
	b, err := os.ReadFile("/proc/" + pid + "/io")
	if err != nil {
		return -1
	}
	var n int64
	found := 0
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ": ")
		if !ok || (k != "syscr" && k != "syscw") {
			continue
		}
		x, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return -1
		}
		n += x
		found++
	}
	if found != 2 {
		return -1
	}
	return n
}
