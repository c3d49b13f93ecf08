package tunnel

import (
	"bufio"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// BenchmarkLocalThroughput: TCP throughput between two members of one
// Manager (the local path: through the tunnel's router namespace), sender
// and receiver netprobe processes in the members' namespaces as in
// chalkbench's tunnel row, without chalkd or sandboxes around;
// BenchmarkTUNThroughput is the same over the TUN-to-TUN path (steered
// forwarders, what carries it where the router cannot be made) and
// BenchmarkVethThroughput the same transfer over a bare veth pair. Each
// iteration sends 256 MiB. Metrics: Gbit/s (depends on the machine's load:
// compare them in one run, alternating with -count), and CPU per GiB,
// which depends far less on the load: this process's (the forwarders:
// chalkd's share of the path) and the sender's and receiver's.
func BenchmarkLocalThroughput(b *testing.B) {
	before, after := localThroughput(b)
	if after.LocalGSO == before.LocalGSO {
		b.Fatal("no segment went whole through the router")
	}
}

func BenchmarkTUNThroughput(b *testing.B) {
	kernelLocalPath = false
	defer func() { kernelLocalPath = true }()
	before, after := localThroughput(b)
	if after.LocalGSO == before.LocalGSO {
		b.Fatal("no segment went whole: not the steered path")
	}
}

func localThroughput(b *testing.B) (before, after Stats) {
	chalktest.RequireRoot(b)
	probe := buildNetprobe(b)
	nsA, nsB := netnsFor(b), netnsFor(b)
	m := NewManager(nil)
	defer m.Close()
	subnet := netip.MustParsePrefix("100.96.10.0/24")
	if _, err := m.Join("org/t", "a", "/run/netns/"+nsA, "wg0", subnet); err != nil {
		b.Fatal(err)
	}
	mb, err := m.Join("org/t", "b", "/run/netns/"+nsB, "wg0", subnet)
	if err != nil {
		b.Fatal(err)
	}
	before = m.Stats()
	blastLoop(b, probe, nsA, nsB, mb.Addr.String())
	return before, m.Stats()
}

func BenchmarkVethThroughput(b *testing.B) {
	chalktest.RequireRoot(b)
	probe := buildNetprobe(b)
	nsA, nsB := netnsFor(b), netnsFor(b)
	for _, argv := range [][]string{
		{"ip", "link", "add", "bv0", "netns", nsA, "type", "veth", "peer", "name", "bv1", "netns", nsB},
		{"ip", "-n", nsA, "addr", "add", "10.254.78.1/30", "dev", "bv0"},
		{"ip", "-n", nsB, "addr", "add", "10.254.78.2/30", "dev", "bv1"},
		{"ip", "-n", nsA, "link", "set", "bv0", "up"},
		{"ip", "-n", nsB, "link", "set", "bv1", "up"},
	} {
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			b.Fatalf("%v: %v %s", argv, err, out)
		}
	}
	blastLoop(b, probe, nsA, nsB, "10.254.78.2")
}

func buildNetprobe(b *testing.B) string {
	probe := filepath.Join(b.TempDir(), "netprobe")
	build := exec.Command("go", "build", "-o", probe, "../daemon/testdata/netprobe")
	build.Env = append(build.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build netprobe: %v %s", err, out)
	}
	return probe
}

// blastLoop runs a sink in nsB on addr and b.N blasts of 256 MiB from nsA.
func blastLoop(b *testing.B, probe, nsA, nsB, addr string) {
	sink := exec.Command("ip", "netns", "exec", nsB, probe, "sink", "5001")
	out, err := sink.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := sink.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = sink.Process.Kill(); _ = sink.Wait() }()
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		b.Fatalf("sink: %q %v", line, err)
	}
	const mib = 256
	var gbps float64
	var peers time.Duration
	sinkCPU := procCPU(b, sink.Process.Pid)
	self := selfCPU()
	b.ResetTimer()
	for range b.N {
		blast := exec.Command("ip", "netns", "exec", nsA, probe, "blast", addr+":5001", strconv.Itoa(mib))
		res, err := blast.Output()
		if err != nil {
			b.Fatalf("blast: %v %s", err, res)
		}
		g, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(string(res), "gbit/s")), 64)
		if err != nil {
			b.Fatalf("blast: %q", res)
		}
		gbps += g
		peers += blast.ProcessState.UserTime() + blast.ProcessState.SystemTime()
	}
	b.StopTimer()
	self = selfCPU() - self
	peers += procCPU(b, sink.Process.Pid) - sinkCPU
	gib := float64(b.N) * mib / 1024
	b.ReportMetric(gbps/float64(b.N), "Gbit/s")
	b.ReportMetric(float64(self.Milliseconds())/gib, "self-ms/GiB")
	b.ReportMetric(float64(peers.Milliseconds())/gib, "peers-ms/GiB")
}

func selfCPU() time.Duration {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procCPU is the user and system time of process pid so far.
func procCPU(b *testing.B, pid int) time.Duration {
	st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+2:]))
	ut, _ := strconv.Atoi(f[11])
	stt, _ := strconv.Atoi(f[12])
	return time.Duration(ut+stt) * time.Second / 100 // USER_HZ
}
