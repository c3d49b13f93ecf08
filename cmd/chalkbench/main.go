// Command chalkbench measures chalkcompute against its physical limits and peers,
// side by side in one run on the same busybox rootfs:
//
//   - time-to-interactive: create a sandbox + first exec of `true`, vs raw
//     `runc run` of `true`, vs `podman run --rm`;
//   - exec round trip of `true` in a running sandbox through the SDK, vs
//     `runc exec`, vs `podman exec`;
//   - image builds: cache hit, last-step rebuild beside buildah;
//   - tunnels: first packet after a member is created, throughput beside a
//     bare veth pair;
//   - MCP gateway: added latency of a tools/call and throughput, beside direct;
//   - chalkd memory per idle sandbox with N running;
//   - lifecycle: terminate (until the call returns), churn (create -> exec ->
//     terminate in 8 clients), burst (50 concurrent creates) and density
//     (host memory per idle sandbox), each beside raw runc in the same run;
//   - fleet: create + first exec, exec round trip and creates/s through a
//     control plane with node agents (3 nodes, and 1), beside an all-in-one
//     chalkd, all started for the run from ./bin (fleet.go);
//   - fleet tunnel: TCP throughput between tunnel members on two fleet
//     nodes, beside two members on one node and a bare veth pair
//     (fleettunnel.go).
//
// It talks to the running chalkd (scripts/setup.sh starts one; not needed for
// -only fleet or -only fleettunnel) and needs root.
// Run it with scripts/bench.sh.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

func main() {
	n := flag.Int("n", 30, "iterations per measurement")
	idle := flag.Int("idle", 200, "sandboxes for the memory-per-idle-sandbox measurement (0 skips it)")
	pidFile := flag.String("chalkd-pid-file", "/run/chalk/chalkd.pid", "chalkd's pid file (for its RSS)")
	only := flag.String("only", "", "comma-separated sections to run: tti,exec,terminal,image,tunnel,mcp,memory,terminate,churn,burst,density,fleet,fleettunnel (default: all)")
	churnFor := flag.Duration("churn-for", 10*time.Second, "how long the churn row runs (each of chalkcompute and raw runc)")
	churnClients := flag.Int("churn-clients", 8, "concurrent clients of the churn row")
	burst := flag.Int("burst", 50, "concurrent creates of the burst row")
	density := flag.Int("density", 50, "idle sandboxes of the density row")
	fleetFor := flag.Duration("fleet-for", 10*time.Second, "how long each creates/s row of the fleet section runs")
	cgroupParent := flag.String("cgroup-parent", "/chalk", "chalkd's --cgroup-parent (for the density row)")
	own := flag.String("own", "", "start a chalkd of this run's own (internal/chalktest: its own network namespace, data dir and cgroup parent, binaries from ./bin or $CHALK_TEST_BIN) with these extra flags (space-separated; \"-\" for none) instead of using the host's")
	flag.Parse()
	want := func(section string) bool {
		return *only == "" || slices.Contains(strings.Split(*only, ","), section)
	}
	ctx := context.Background()
	host, _ := os.Hostname()
	header := func() {
		fmt.Printf("chalkbench %s on %s (%d cpus, %s/%s), n=%d\n\n", time.Now().UTC().Format("2006-01-02"), host, runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, *n)
	}
	if *only == "fleet" || *only == "fleettunnel" { // starts its own chalkds: no host chalkd needed
		header()
		if want("fleet") {
			fleetBench(ctx, *n, *churnClients, *fleetFor)
		}
		if want("fleettunnel") {
			fleetTunnelBench(ctx)
		}
		return
	}
	var c *chalkcompute.Client
	if *own != "" {
		d := startOwn(*own)
		defer d.close()
		c, *pidFile, *cgroupParent, upstreamNetns = d.client, d.pidFile, d.cgroupParent, d.netns
	} else {
		var err error
		if c, err = chalkcompute.NewClient(); err != nil {
			fail(err)
		}
	}
	if _, err := c.PullImage(ctx, "busybox", nil); err != nil {
		fail(err)
	}
	work, err := os.MkdirTemp("", "chalkbench-")
	if err != nil {
		fail(err)
	}
	defer os.RemoveAll(work)
	bundle, err := busyboxBundle(work)
	if err != nil {
		fail(err)
	}
	header()

	if want("tti") {
		ttiBench(ctx, c, work, bundle, *n)
	}
	if want("exec") {
		execBench(ctx, c, work, bundle, *n)
	}
	if want("terminal") {
		terminalBench(ctx, c, *n)
	}
	if want("image") {
		imageBench(ctx, c, work, *n)
	}
	if want("tunnel") {
		tunnelBench(ctx, c, work, *n)
	}
	if want("mcp") {
		mcpBench(ctx, c, work, *n, *pidFile)
	}
	if want("memory") && *idle > 0 {
		memoryPerSandbox(ctx, c, *idle, *pidFile)
	}
	peer := newRuncPeer(work, bundle)
	if want("terminate") {
		terminateBench(ctx, c, peer, *n)
	}
	if want("churn") {
		churnBench(ctx, c, peer, *churnClients, *churnFor, *pidFile)
	}
	if want("burst") {
		burstBench(ctx, c, peer, *burst)
	}
	if want("density") && *density > 0 {
		densityBench(ctx, c, peer, *density, *pidFile, *cgroupParent)
	}
	if want("fleet") {
		fleetBench(ctx, *n, *churnClients, *fleetFor)
	}
	if want("fleettunnel") {
		fleetTunnelBench(ctx)
	}
}

func ttiBench(ctx context.Context, c *chalkcompute.Client, work, bundle string, n int) {
	// Time to interactive, from a pre-started sandbox (one made ready,
	// untimed, before each create) and cold (none kept for busybox).
	prestart := func(k int) {
		if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(k)); err != nil {
			fail(err)
		}
	}
	var last *chalkcompute.Sandbox
	createExec := func() error {
		sb, err := c.Create(ctx, chalkcompute.Base("busybox"))
		if err != nil {
			return err
		}
		last = sb
		res, err := sb.Exec(ctx, []string{"true"})
		if err == nil && res.Code != 0 {
			err = fmt.Errorf("true exited %d", res.Code)
		}
		return err
	}
	prestart(1)
	warm := measureWithCleanup(n, createExec, func() { _, _ = last.Terminate(ctx); prestart(1) })
	prestart(0)
	cold := measureWithCleanup(n, createExec, func() { _, _ = last.Terminate(ctx) })
	// Leave busybox with the node's default count (chalkd --prestart).
	prestart(2)
	runcRun := measure(n, func() error {
		return run("runc", "--root", filepath.Join(work, "runc"), "run", "--bundle", bundle, "bench-"+strconv.FormatInt(time.Now().UnixNano(), 36))
	}, false)
	podmanRun, podmanErr := podmanMeasure(n, work, "run")
	fmt.Println("time-to-interactive (create + first exec of `true`)")
	row("chalkcompute pre-started", warm, runcRun)
	row("chalkcompute cold", cold, runcRun)
	row("runc run (raw)", runcRun, runcRun)
	rowOpt("podman run --rm", podmanRun, runcRun, podmanErr)
	fmt.Printf("goal: pre-started median <= 5ms: %s; cold median <= 1.0x raw runc run: %s\n\n",
		verdict(median(warm) <= 5*time.Millisecond), verdict(median(cold) <= median(runcRun)))
}

func execBench(ctx context.Context, c *chalkcompute.Client, work, bundle string, n int) {
	// Exec round trip.
	sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithTimeout(30*time.Minute))
	if err != nil {
		fail(err)
	}
	defer sb.Terminate(ctx)
	// The floor: fork + exec + wait of the same static busybox `true` on
	// the host, by this process (Go's os/exec: vfork), taking turns with
	// the SDK's execs so both see the same load.
	bb, bbErr := exec.LookPath("busybox")
	var execRT, forkExec []time.Duration
	for range n * 10 {
		execRT = append(execRT, measure(1, func() error {
			_, err := sb.Exec(ctx, []string{"true"})
			return err
		}, false)...)
		if bbErr == nil {
			forkExec = append(forkExec, measure(1, func() error { return exec.Command(bb, "true").Run() }, false)...)
		}
	}
	sort.Slice(execRT, func(i, j int) bool { return execRT[i] < execRT[j] })
	sort.Slice(forkExec, func(i, j int) bool { return forkExec[i] < forkExec[j] })
	id := "bench-exec-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := runDetached(work, bundle, id); err != nil {
		fail(err)
	}
	defer run("runc", "--root", filepath.Join(work, "runc"), "delete", "--force", id)
	runcExec := measure(n, func() error {
		return run("runc", "--root", filepath.Join(work, "runc"), "exec", id, "true")
	}, false)
	podmanExec, podmanExecErr := podmanMeasure(n, work, "exec")
	fmt.Println("exec round trip of `true` in a running sandbox")
	row("chalkcompute (SDK)", execRT, runcExec)
	row("runc exec (raw)", runcExec, runcExec)
	rowOpt("podman exec", podmanExec, runcExec, podmanExecErr)
	rowOpt("fork+exec busybox (host)", forkExec, runcExec, bbErr)
	if bbErr == nil {
		fmt.Printf("  SDK exec minus the host's fork+exec of `true`: %s (chalkd, the API, init's protocol)\n", (median(execRT) - median(forkExec)).Round(10*time.Microsecond))
	}
	fmt.Printf("goal: median <= 1ms (fork+exec of `true` alone is ~0.5-1ms): %s\n\n", verdict(median(execRT) <= time.Millisecond))
}

func memoryPerSandbox(ctx context.Context, c *chalkcompute.Client, count int, pidFile string) {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		fmt.Printf("memory per idle sandbox: skipped (%v)\n", err)
		return
	}
	pid := strings.TrimSpace(string(b))
	before := rss(pid)
	var sbs []*chalkcompute.Sandbox
	defer func() {
		for _, sb := range sbs {
			_, _ = sb.Terminate(ctx)
		}
	}()
	for range count {
		sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithTimeout(30*time.Minute))
		if err != nil {
			fmt.Printf("memory per idle sandbox: create failed after %d: %v\n", len(sbs), err)
			return
		}
		sbs = append(sbs, sb)
	}
	runtime.GC()
	after := rss(pid)
	per := float64(after-before) / float64(count) / 1024
	fmt.Printf("chalkd memory per idle sandbox (%d running): %.2f MiB (RSS %d -> %d KiB); goal <= 2 MiB: %s\n",
		count, per, before, after, verdict(per <= 2))
}

func rss(pid string) int64 { return procField("/proc/"+pid+"/status", "VmRSS:") }

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

// atFail, if set, runs before fail exits (the fleet rows remove the chalkds
// they started).
var atFail func()

func fail(err error) {
	if f := atFail; f != nil {
		atFail = nil
		f()
	}
	fmt.Fprintln(os.Stderr, "chalkbench:", err)
	os.Exit(1)
}

func run(argv ...string) error {
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(argv, " "), err, out)
	}
	return nil
}

// measureWithCleanup times f, running cleanup (untimed) after each iteration.
func measureWithCleanup(n int, f func() error, cleanup func()) []time.Duration {
	ds := make([]time.Duration, 0, n)
	for i := range n + 1 {
		start := time.Now()
		if err := f(); err != nil {
			fail(err)
		}
		d := time.Since(start)
		cleanup()
		if i > 0 { // the first iteration warms caches
			ds = append(ds, d)
		}
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return ds
}

func measure(n int, f func() error, warm bool) []time.Duration {
	if warm {
		_ = f()
	}
	ds := make([]time.Duration, 0, n)
	for range n {
		start := time.Now()
		if err := f(); err != nil {
			fail(err)
		}
		ds = append(ds, time.Since(start))
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return ds
}

func median(ds []time.Duration) time.Duration { return ds[len(ds)/2] }
func p90(ds []time.Duration) time.Duration    { return ds[len(ds)*9/10] }

func row(name string, ds, ref []time.Duration) {
	fmt.Printf("  %-25s median %9s  p90 %9s  ratio vs raw runc %.3fx\n", name, median(ds).Round(10*time.Microsecond), p90(ds).Round(10*time.Microsecond), float64(median(ds))/float64(median(ref)))
}

func rowOpt(name string, ds, ref []time.Duration, err error) {
	if err != nil {
		fmt.Printf("  %-25s n/a (%v)\n", name, err)
		return
	}
	row(name, ds, ref)
}
