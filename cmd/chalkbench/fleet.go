package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// The fleet rows: an all-in-one chalkd, and a control plane (`chalkd
// control`) with three node agents (`chalkd node`), started for this run by
// internal/chalktest as the fleet e2e test starts them (each in its own
// network namespace, data dir, sandbox subnet and cgroup parent; the nodes
// linked to the control plane's netns by veth pairs), from the binaries in
// ./bin (scripts/build.sh) or $CHALK_TEST_BIN. All of them share this one
// machine, so the fleet rows measure what the control plane and the node
// API add, not a scale-out: three nodes on the same cores have no more CPU
// than one.

// harness is the chalktest.TB of the fleet rows: chalkds it starts are
// removed by close; a fatal error or a skip unwinds to fleetBench.
type harness struct {
	cleanups []func()
	failed   bool
}

type harnessStop struct {
	msg  string
	skip bool
}

func (h *harness) Helper()          {}
func (h *harness) Cleanup(f func()) { h.cleanups = append(h.cleanups, f) }
func (h *harness) Failed() bool     { return h.failed }
func (h *harness) Fatal(args ...any) {
	h.failed = true
	panic(harnessStop{msg: fmt.Sprint(args...)})
}
func (h *harness) Fatalf(format string, args ...any) {
	h.failed = true
	panic(harnessStop{msg: fmt.Sprintf(format, args...)})
}
func (h *harness) Skip(args ...any) { panic(harnessStop{msg: fmt.Sprint(args...), skip: true}) }
func (h *harness) Skipf(format string, args ...any) {
	panic(harnessStop{msg: fmt.Sprintf(format, args...), skip: true})
}
func (h *harness) Logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "chalkbench fleet: "+format+"\n", args...)
}
func (h *harness) TempDir() string {
	d, err := os.MkdirTemp("", "chalkbench-fleet-")
	if err != nil {
		h.Fatal(err)
	}
	h.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func (h *harness) close() {
	for i := len(h.cleanups) - 1; i >= 0; i-- {
		h.cleanups[i]()
	}
	h.cleanups = nil
}

// fleetBench prints, side by side in one run, create + first exec, the
// exec round trip and creates/s of an all-in-one chalkd and of the fleet
// (3 nodes, and 1 node: the other two cordoned).
func fleetBench(ctx context.Context, n, clients int, d time.Duration) {
	useTreeBin()
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
				fmt.Printf("fleet: skipped (%s)\n\n", s.msg)
				return
			}
			fail(fmt.Errorf("fleet: %s", s.msg))
		}
	}()

	// Both sides start cold: neither the all-in-one chalkd nor the nodes
	// run pre-started sandboxes here (the cold path is compared).
	aio := chalktest.Start(h, "--prestart", "0")
	control := chalktest.StartControl(h)
	for i := 1; i <= 3; i++ {
		chalktest.StartFleetNodeArgs(h, control, i, "--prestart", "0")
	}
	waitNodes(h, control, "node1", "node2", "node3")
	ac, fc := aio.Client(), control.Client()

	// Create + first exec, and the exec round trip: the all-in-one chalkd
	// and the fleet take turns, one iteration each, so a shared machine's
	// drifting load favours neither (the first round warms caches, untimed).
	createExec := func(c *chalkcompute.Client) (time.Duration, *chalkcompute.Sandbox, error) {
		start := time.Now()
		sb, err := c.Create(ctx, chalkcompute.Base("busybox"))
		if err != nil {
			return 0, nil, err
		}
		res, err := sb.Exec(ctx, []string{"true"})
		if err == nil && res.Code != 0 {
			err = fmt.Errorf("true exited %d", res.Code)
		}
		return time.Since(start), sb, err
	}
	var aioTTI, fleetTTI []time.Duration
	for i := range n + 1 {
		for _, side := range []struct {
			c  *chalkcompute.Client
			ds *[]time.Duration
		}{{ac, &aioTTI}, {fc, &fleetTTI}} {
			d, sb, err := createExec(side.c)
			if err != nil {
				h.Fatalf("create + exec: %v", err)
			}
			_, _ = sb.Terminate(ctx)
			if i > 0 {
				*side.ds = append(*side.ds, d)
			}
		}
	}
	sortDurations(aioTTI)
	sortDurations(fleetTTI)

	var execSbs []*chalkcompute.Sandbox
	for _, c := range []*chalkcompute.Client{ac, fc} {
		sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithTimeout(30*time.Minute))
		if err != nil {
			h.Fatalf("create: %v", err)
		}
		defer sb.Terminate(ctx)
		execSbs = append(execSbs, sb)
	}
	var aioExec, fleetExec []time.Duration
	for i := range n*10 + 1 {
		for k, ds := range []*[]time.Duration{&aioExec, &fleetExec} {
			start := time.Now()
			if _, err := execSbs[k].Exec(ctx, []string{"true"}); err != nil {
				h.Fatalf("exec: %v", err)
			}
			if i > 0 {
				*ds = append(*ds, time.Since(start))
			}
		}
	}
	sortDurations(aioExec)
	sortDurations(fleetExec)

	churn := func(c *chalkcompute.Client, d time.Duration) float64 {
		rate, _ := loopFor(clients, d, func() error { return churnOnce(ctx, c) })
		return rate
	}
	// Each row runs d/2 twice, in the order all-in-one, 3 nodes, 1 node,
	// 1 node, 3 nodes, all-in-one, and reports the mean: the drift of a
	// shared machine's load (and the teardowns a row leaves running) favour
	// no row.
	setState := func(cmd string) {
		for _, name := range []string{"node2", "node3"} {
			if _, errOut, code := control.CLI("admin", "node", cmd, name); code != 0 {
				h.Fatalf("%s %s: %s", cmd, name, errOut)
			}
		}
	}
	var aioRate, fleet3, fleet1 float64
	aioRate += churn(ac, d/2)
	fleet3 += churn(fc, d/2)
	setState("cordon")
	fleet1 += churn(fc, d/2)
	fleet1 += churn(fc, d/2)
	setState("uncordon")
	fleet3 += churn(fc, d/2)
	aioRate += churn(ac, d/2)
	aioRate, fleet3, fleet1 = aioRate/2, fleet3/2, fleet1/2

	fmt.Println("fleet: all-in-one chalkd vs control plane + node agents (chalkd control / chalkd node), each in its own netns on this machine, no pre-started sandboxes")
	frow := func(name string, ds, ref []time.Duration) {
		fmt.Printf("  %-25s median %9s  p90 %9s  ratio vs all-in-one %.3fx\n", name, median(ds).Round(10*time.Microsecond), p90(ds).Round(10*time.Microsecond), float64(median(ds))/float64(median(ref)))
	}
	fmt.Println(" create + first exec of `true` (the two sides take turns)")
	frow("all-in-one (cold)", aioTTI, aioTTI)
	frow("fleet, 3 nodes", fleetTTI, aioTTI)
	fmt.Println(" exec round trip of `true` (the two sides take turns)")
	frow("all-in-one", aioExec, aioExec)
	frow("fleet (via node API)", fleetExec, aioExec)
	fmt.Printf(" creates/s: create -> exec `true` -> terminate, %d clients, 2 x %s per row (interleaved)\n", clients, d/2)
	for _, r := range []struct {
		name string
		rate float64
	}{{"all-in-one", aioRate}, {"fleet, 1 node", fleet1}, {"fleet, 3 nodes", fleet3}} {
		fmt.Printf("  %-25s %7.1f sandboxes/s  ratio vs all-in-one %.3fx\n", r.name, r.rate, r.rate/aioRate)
	}
	fmt.Printf("  (3 nodes vs 1 node: %.3fx; the nodes share this machine's %d cores)\n\n", fleet3/fleet1, runtime.NumCPU())
}

// waitNodes waits until the control plane lists the named nodes healthy.
func waitNodes(h *harness, control *chalktest.Node, names ...string) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, errOut, code := control.CLI("admin", "node", "ls", "-o", "json")
		if code != 0 {
			h.Fatalf("chalk admin node ls: %s", errOut)
		}
		var ns []map[string]any
		if err := json.Unmarshal([]byte(out), &ns); err != nil {
			h.Fatalf("node ls -o json: %v", err)
		}
		healthy := map[string]bool{}
		for _, n := range ns {
			name, _ := n["name"].(string)
			healthy[name] = n["healthy"] == true
		}
		all := true
		for _, name := range names {
			all = all && healthy[name]
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			h.Fatalf("nodes not healthy on the control plane after 60s: %s", out)
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the nodes' heartbeats
	}
}
