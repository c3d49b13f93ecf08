package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

// The lifecycle rows: terminate, churn, burst and density, each beside raw
// runc doing the same in the same run (the machine may be shared: only the
// ratios against the peer of the same run compare across runs).

// runcPeer runs raw runc on the busybox bundle, in a cgroup parent of its own
// (for the density row).
type runcPeer struct {
	root, bundle, work string
	seq                atomic.Int64
}

func newRuncPeer(work, bundle string) *runcPeer {
	return &runcPeer{root: filepath.Join(work, "runc"), bundle: bundle, work: work}
}

const peerCgroup = "/chalkbench-peer"

func (p *runcPeer) id(prefix string) string {
	return fmt.Sprintf("bench-%s-%d-%s", prefix, p.seq.Add(1), strconv.FormatInt(time.Now().UnixNano(), 36))
}

// run is `runc run` of `true` (create, start, wait, delete).
func (p *runcPeer) run() error {
	return run("runc", "--root", p.root, "run", "--bundle", p.bundle, p.id("run"))
}

// sleepBundle is a bundle running sleep, in the peer cgroup parent.
func (p *runcPeer) sleepBundle(id string) (string, error) {
	b, err := os.ReadFile(filepath.Join(p.bundle, "config.json"))
	if err != nil {
		return "", err
	}
	var spec map[string]any
	if err := json.Unmarshal(b, &spec); err != nil {
		return "", err
	}
	spec["process"].(map[string]any)["args"] = []string{"/bin/sleep", "3600"}
	spec["root"].(map[string]any)["path"] = filepath.Join(p.bundle, "rootfs")
	spec["linux"].(map[string]any)["cgroupsPath"] = peerCgroup + "/" + id
	dir := filepath.Join(p.work, "bundles", id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	b, _ = json.Marshal(spec)
	return dir, os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644)
}

// start starts a detached sleeping container (a peer of an idle sandbox).
func (p *runcPeer) start(id string) error {
	dir, err := p.sleepBundle(id)
	if err != nil {
		return err
	}
	devnull, _ := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	defer devnull.Close()
	cmd := exec.Command("runc", "--root", p.root, "run", "-d", "--bundle", dir, id)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("runc run -d %s: %w", id, err)
	}
	return nil
}

func (p *runcPeer) remove(id string) error {
	err := run("runc", "--root", p.root, "delete", "--force", id)
	_ = os.RemoveAll(filepath.Join(p.work, "bundles", id))
	return err
}

// terminateBench times Terminate until the call returns, beside `runc delete
// --force` of a running container.
func terminateBench(ctx context.Context, c *chalkcompute.Client, p *runcPeer, n int) {
	ds := make([]time.Duration, 0, n)
	for range n {
		sb, err := c.Create(ctx, chalkcompute.Base("busybox"))
		if err != nil {
			fail(err)
		}
		if _, err := sb.Exec(ctx, []string{"true"}); err != nil {
			fail(err)
		}
		start := time.Now()
		if _, err := sb.Terminate(ctx); err != nil {
			fail(err)
		}
		ds = append(ds, time.Since(start))
	}
	sortDurations(ds)
	var peer []time.Duration
	for range n {
		id := p.id("term")
		if err := p.start(id); err != nil {
			fail(err)
		}
		start := time.Now()
		if err := p.remove(id); err != nil {
			fail(err)
		}
		peer = append(peer, time.Since(start))
	}
	sortDurations(peer)
	fmt.Println("terminate (until the call returns; teardown may continue)")
	row("chalkcompute (SDK)", ds, peer)
	row("runc delete --force (raw)", peer, peer)
	fmt.Printf("goal: median <= 10ms: %s\n\n", verdict(median(ds) <= 10*time.Millisecond))
}

// churnBench runs create -> exec `true` -> terminate in 8 clients for d and
// counts completed sandboxes per second, beside 8 clients of `runc run` (for
// d/2 before and d/2 after).
//
// Beside the rates it prints the CPU time each sandbox cost: chalkd's and
// that of the processes it reaped (runc, the sandbox's init and what ran in
// it, the user namespace's holder), from before the chalkcompute loop until
// after the peer's second half (when the background teardowns have
// ended), per sandbox; and the peer's (this process's reaped children) per
// container. CPU time is what a shared machine's load distorts least; what
// the kernel does in its own threads (namespace and cgroup cleanup) is in
// neither figure.
func churnBench(ctx context.Context, c *chalkcompute.Client, p *runcPeer, clients int, d time.Duration, pidFile string) {
	// The peer runs half its time before and half after (as burst's).
	peerCPU0 := childrenCPU()
	peerBefore, n1 := loopFor(clients, d/2, p.run)
	peerCPU1 := childrenCPU()
	chalkdPid := ""
	if b, err := os.ReadFile(pidFile); err == nil {
		chalkdPid = strings.TrimSpace(string(b))
	}
	chalkdCPU0 := procCPU(chalkdPid)
	chalk, nc := loopFor(clients, d, func() error { return churnOnce(ctx, c) })
	peerCPU2 := childrenCPU()
	peerAfter, n2 := loopFor(clients, d/2, p.run)
	chalkdCPU1 := procCPU(chalkdPid)
	peerPer := (childrenCPU() - peerCPU2 + peerCPU1 - peerCPU0) / time.Duration(max(n1+n2, 1))
	peer := (peerBefore + peerAfter) / 2
	fmt.Printf("churn: create -> exec `true` -> terminate, %d clients for %s\n", clients, d)
	fmt.Printf("  %-25s %7.1f sandboxes/s  ratio vs raw runc %.3fx", "chalkcompute (SDK)", chalk, chalk/peer)
	if chalkdCPU0 >= 0 && chalkdCPU1 >= 0 && nc > 0 {
		per := (chalkdCPU1 - chalkdCPU0) / time.Duration(nc)
		fmt.Printf("; CPU %.1f ms per sandbox (chalkd and what it reaped; %.2fx raw runc's)", ms(per), float64(per)/float64(max(peerPer, 1)))
	}
	fmt.Println()
	fmt.Printf("  %-25s %7.1f containers/s; CPU %.1f ms per container\n", "runc run (raw)", peer, ms(peerPer))
	fmt.Printf("goal: >= 30/s: %s\n\n", verdict(chalk >= 30))
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// childrenCPU is the user + system CPU time of this process's reaped
// children.
func childrenCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procCPU is process pid's user + system CPU time and its reaped
// children's (/proc/PID/stat utime, stime, cutime, cstime); -1 if unknown.
func procCPU(pid string) time.Duration {
	if pid == "" {
		return -1
	}
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return -1
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return -1
	}
	// After "pid (comm)": state is field 3; utime..cstime are 14..17.
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 15 {
		return -1
	}
	var ticks int64
	for _, s := range f[11:15] {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return -1
		}
		ticks += v
	}
	return time.Duration(ticks) * time.Second / 100 // USER_HZ
}

// loopFor runs f in k goroutines until d has passed and returns completions
// per second. An error ends the benchmark.
func loopFor(k int, d time.Duration, f func() error) (float64, int64) {
	var done atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	end := start.Add(d)
	for range k {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				if err := f(); err != nil {
					fail(err)
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	return float64(done.Load()) / time.Since(start).Seconds(), done.Load()
}

// burstBench creates k sandboxes at once, each until its first exec returns
// (all interactive), beside k concurrent `runc run` of `true` measured
// before and after it (the ratio is against their mean: the load of a
// shared machine, and the kernel's cleanup of namespaces a previous row
// left, favour neither side). The pool keeps the node's default count:
// creates beyond it start cold.
func burstBench(ctx context.Context, c *chalkcompute.Client, p *runcPeer, k int) {
	peerBefore := p.burst(k)
	sbs := make([]*chalkcompute.Sandbox, k)
	each := make([]time.Duration, k)
	errs := make([]error, k)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range k {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.Now()
			sb, err := c.Create(ctx, chalkcompute.Base("busybox"))
			if err != nil {
				errs[i] = err
				return
			}
			sbs[i] = sb
			res, err := sb.Exec(ctx, []string{"true"})
			if err == nil && res.Code != 0 {
				err = fmt.Errorf("true exited %d", res.Code)
			}
			errs[i] = err
			each[i] = time.Since(t)
		}()
	}
	wg.Wait()
	chalk := time.Since(start)
	failed := 0
	for i, err := range errs {
		if err != nil {
			failed++
			fmt.Printf("  burst create %d: %v\n", i, err)
		}
	}
	for _, sb := range sbs {
		if sb != nil {
			_, _ = sb.Terminate(ctx)
		}
	}
	peerAfter := p.burst(k)
	peer := (peerBefore + peerAfter) / 2
	sortDurations(each)
	fmt.Printf("burst: %d concurrent creates, each until its first exec returns\n", k)
	fmt.Printf("  %-25s all done %9s  (per create median %s, max %s)  ratio vs raw runc %.3fx\n", "chalkcompute (SDK)",
		chalk.Round(time.Millisecond), median(each).Round(time.Millisecond), each[len(each)-1].Round(time.Millisecond), float64(chalk)/float64(peer))
	fmt.Printf("  %-25s all done %9s  (before %s, after %s)\n", "runc run (raw)", peer.Round(time.Millisecond), peerBefore.Round(time.Millisecond), peerAfter.Round(time.Millisecond))
	fmt.Printf("goal: <= 1.2x raw runc, none failed (%d failed): %s\n\n", failed, verdict(failed == 0 && float64(chalk) <= 1.2*float64(peer)))
}

// burst runs k `runc run` of `true` at once and returns how long all took.
func (p *runcPeer) burst(k int) time.Duration {
	errs := make([]error, k)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range k {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = p.run() }()
	}
	wg.Wait()
	d := time.Since(start)
	for _, err := range errs {
		if err != nil {
			fail(err)
		}
	}
	return d
}

// densityBench measures host memory per idle sandbox: the sandboxes' cgroup
// memory (processes, page cache and kernel memory charged to them), chalkd's
// RSS growth and the drop of MemAvailable (the whole host: noisy on a shared
// machine), beside the same number of idle `runc run -d` containers.
func densityBench(ctx context.Context, c *chalkcompute.Client, p *runcPeer, count int, pidFile, cgroupParent string) {
	pid := ""
	if b, err := os.ReadFile(pidFile); err == nil {
		pid = strings.TrimSpace(string(b))
	}
	// No pre-started members during the measurement (they would be counted
	// as they come and go); the node default is restored after.
	if _, err := c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(0)); err != nil {
		fail(err)
	}
	defer func() { _, _ = c.WarmImage(ctx, "busybox", nil, chalkcompute.WithPrestarted(2)) }()
	availBefore, rssBefore := memAvailable(), rss(pid)
	var sbs []*chalkcompute.Sandbox
	defer func() {
		for _, sb := range sbs {
			_, _ = sb.Terminate(ctx)
		}
	}()
	for range count {
		sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithTimeout(30*time.Minute))
		if err != nil {
			fmt.Printf("density: create failed after %d: %v\n", len(sbs), err)
			return
		}
		sbs = append(sbs, sb)
	}
	var cg int64
	var inits []int64
	var parts []memParts
	for _, sb := range sbs {
		cg += cgroupMemory(filepath.Join(cgroupParent, sb.ID()))
		parts = append(parts, sandboxMemParts(filepath.Join(cgroupParent, sb.ID())))
	}
	inits = initRSS(cgroupParent, sbs)
	availAfter, rssAfter := memAvailable(), rss(pid)
	chalkPer := float64(cg)/float64(count)/(1<<20) + float64(rssAfter-rssBefore)/float64(count)/1024
	hostPer := float64(availBefore-availAfter) / float64(count) / 1024

	var ids []string
	defer func() {
		for _, id := range ids {
			_ = p.remove(id)
		}
	}()
	pAvailBefore := memAvailable()
	for range count {
		id := p.id("idle")
		if err := p.start(id); err != nil {
			fail(err)
		}
		ids = append(ids, id)
	}
	var pcg int64
	var pparts []memParts
	for _, id := range ids {
		pcg += cgroupMemory(filepath.Join(peerCgroup, id))
		pparts = append(pparts, sandboxMemParts(filepath.Join(peerCgroup, id)))
	}
	pAvailAfter := memAvailable()
	peerPer := float64(pcg) / float64(count) / (1 << 20)
	pHostPer := float64(pAvailBefore-pAvailAfter) / float64(count) / 1024

	fmt.Printf("density: host memory per idle sandbox, %d running\n", count)
	fmt.Printf("  %-25s %.2f MiB (its cgroup + chalkd's RSS growth %.3f MiB); host MemAvailable drop %.2f MiB; chalk-init RSS median %.2f MiB  ratio vs raw runc %.3fx\n",
		"chalkcompute", chalkPer, float64(rssAfter-rssBefore)/float64(count)/1024, hostPer, medianInt(inits)/1024, chalkPer/peerPer)
	printMemParts(parts)
	fmt.Printf("  %-25s %.2f MiB (its cgroup; a sleeping busybox); host MemAvailable drop %.2f MiB\n", "runc run -d (raw)", peerPer, pHostPer)
	printMemParts(pparts)
	fmt.Printf("goal: <= 1 MiB: %s\n\n", verdict(chalkPer <= 1))
}

func memAvailable() int64 { return procField("/proc/meminfo", "MemAvailable:") }

// procField is the number after key in a /proc file of "key value ..."
// lines (0 if absent).
func procField(path, key string) int64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == key {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			return v
		}
	}
	return 0
}

// churnOnce is one round of the churn rows: create, exec `true`, terminate.
func churnOnce(ctx context.Context, c *chalkcompute.Client) error {
	sb, err := c.Create(ctx, chalkcompute.Base("busybox"))
	if err != nil {
		return err
	}
	res, err := sb.Exec(ctx, []string{"true"})
	if err == nil && res.Code != 0 {
		err = fmt.Errorf("true exited %d", res.Code)
	}
	if _, terr := sb.Terminate(ctx); err == nil {
		err = terr
	}
	return err
}

// cgroupMemory is a cgroup's memory use in bytes (cgroup v2, else v1).
func cgroupMemory(path string) int64 {
	for _, f := range []string{
		filepath.Join("/sys/fs/cgroup", path, "memory.current"),
		filepath.Join("/sys/fs/cgroup/memory", path, "memory.usage_in_bytes"),
	} {
		if b, err := os.ReadFile(f); err == nil {
			v, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
			return v
		}
	}
	return 0
}

// initRSS returns the RSS (KiB) of each sandbox's init: the first process of
// its cgroup.
func initRSS(cgroupParent string, sbs []*chalkcompute.Sandbox) []int64 {
	var out []int64
	for _, sb := range sbs {
		for _, f := range []string{
			filepath.Join("/sys/fs/cgroup", cgroupParent, sb.ID(), "cgroup.procs"),
			filepath.Join("/sys/fs/cgroup/memory", cgroupParent, sb.ID(), "cgroup.procs"),
		} {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			if pids := strings.Fields(string(b)); len(pids) > 0 {
				out = append(out, rss(pids[0]))
			}
			break
		}
	}
	return out
}

func medianInt(v []int64) float64 {
	if len(v) == 0 {
		return 0
	}
	sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	return float64(v[len(v)/2])
}
