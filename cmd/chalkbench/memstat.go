package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// The density row's breakdown: where an idle sandbox's memory goes, read
// from its memory cgroup and its init's /proc files (docs/ARCHITECTURE.md,
// "Where the time and memory go").

// memParts is one sandbox's memory, in bytes, by part.
type memParts map[string]int64

// memPartNames are the parts printed, in order.
var memPartNames = []string{
	"cgroup", "anon", "file", "kernel", "slab", "stack+pt", "procs", "init threads", "init anon", "init rss", "init pss", "init pt",
}

// sandboxMemParts reads the parts of the sandbox whose cgroupfs path is cg:
// cgroup v2 (memory.current, memory.stat) or v1 (memory.usage_in_bytes,
// memory.stat, memory.kmem.*).
func sandboxMemParts(cg string) memParts {
	p := memParts{}
	procs := ""
	if b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", cg, "memory.current")); err == nil {
		p["cgroup"] = atoi(string(b))
		st := keyValues(filepath.Join("/sys/fs/cgroup", cg, "memory.stat"))
		p["anon"], p["file"] = st["anon"], st["file"]
		p["slab"] = st["slab"]
		p["stack+pt"] = st["kernel_stack"] + st["pagetables"]
		p["kernel"] = st["kernel"]
		if p["kernel"] == 0 {
			p["kernel"] = st["kernel_stack"] + st["pagetables"] + st["slab"] + st["sock"] + st["percpu"]
		}
		procs = filepath.Join("/sys/fs/cgroup", cg, "cgroup.procs")
	} else {
		dir := filepath.Join("/sys/fs/cgroup/memory", cg)
		b, _ := os.ReadFile(filepath.Join(dir, "memory.usage_in_bytes"))
		p["cgroup"] = atoi(string(b))
		st := keyValues(filepath.Join(dir, "memory.stat"))
		p["anon"], p["file"] = st["rss"], st["cache"]
		b, _ = os.ReadFile(filepath.Join(dir, "memory.kmem.usage_in_bytes"))
		p["kernel"] = atoi(string(b))
		// v1 splits kernel memory no further (memory.kmem.slabinfo is
		// empty on kernels since 5.9).
		procs = filepath.Join(dir, "cgroup.procs")
	}
	b, _ := os.ReadFile(procs)
	pids := strings.Fields(string(b))
	p["procs"] = int64(len(pids))
	if len(pids) > 0 {
		p["init threads"] = procField("/proc/"+pids[0]+"/status", "Threads:")
		p["init pt"] = procField("/proc/"+pids[0]+"/status", "VmPTE:") * 1024
		r := keyValues("/proc/" + pids[0] + "/smaps_rollup")
		p["init anon"], p["init rss"], p["init pss"] = r["Anonymous:"]*1024, r["Rss:"]*1024, r["Pss:"]*1024
	}
	return p
}

// printMemParts prints the median of each part over the sandboxes.
func printMemParts(parts []memParts) {
	if len(parts) == 0 {
		return
	}
	var b strings.Builder
	for _, name := range memPartNames {
		v := make([]int64, 0, len(parts))
		for _, p := range parts {
			if x, ok := p[name]; ok {
				v = append(v, x)
			}
		}
		if len(v) == 0 {
			continue
		}
		m := medianInt(v)
		switch name {
		case "procs", "init threads":
			fmt.Fprintf(&b, " %s %.0f;", name, m)
		default:
			fmt.Fprintf(&b, " %s %.0f KiB;", name, m/1024)
		}
	}
	fmt.Printf("  %-25s median per sandbox:%s\n", "  breakdown", strings.TrimSuffix(b.String(), ";"))
}

// keyValues reads a file of "key value" lines (memory.stat) or "key: value
// kB" lines (smaps_rollup; the key keeps its colon).
func keyValues(path string) map[string]int64 {
	out := map[string]int64{}
	b, err := os.ReadFile(path)
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 {
			if v, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				out[f[0]] = v
			}
		}
	}
	return out
}

func atoi(s string) int64 {
	v, _ := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	return v
}
