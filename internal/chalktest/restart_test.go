package chalktest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// fatalTB is a TB whose Fatal ends the calling goroutine and is recorded.
type fatalTB struct {
	*testing.T
	mu    sync.Mutex
	fatal string
}

func (f *fatalTB) Fatalf(format string, args ...any) {
	f.mu.Lock()
	f.fatal = fmt.Sprintf(format, args...)
	f.mu.Unlock()
	runtime.Goexit()
}

func (f *fatalTB) Fatal(args ...any) { f.Fatalf("%s", fmt.Sprint(args...)) }

// TestRestartWaitsForNewProcess: a node-mode Restart waits for the new
// process's "chalkd node serving", not an earlier process's line in the same
// log: a chalkd that exits without serving fails it. Before, the earlier
// line made Restart return at once (a flake source: tests went on before
// the restarted node served).
func TestRestartWaitsForNewProcess(t *testing.T) {
	RequireRoot(t)
	netns := "chalktest-restart-" + strconv.Itoa(os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", netns).CombinedOutput(); err != nil {
		t.Skipf("ip netns add: %v %s", err, out)
	}
	defer exec.Command("ip", "netns", "del", netns).Run()
	bin := t.TempDir()
	// A chalkd that fails to start (says why, does not serve).
	if err := os.WriteFile(filepath.Join(bin, "chalkd"), []byte("#!/bin/sh\necho 'chalkd: cannot start' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	logPath := filepath.Join(dir, "chalkd.log")
	if err := os.WriteFile(logPath, []byte("level=INFO msg=\"chalkd node serving\" (an earlier process)\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tb := &fatalTB{T: t}
	n := &Node{t: tb, Dir: dir, RunDir: dir, Netns: netns, BinDir: bin, Mode: "node", logPath: logPath}
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.Restart()
	}()
	<-done
	tb.mu.Lock()
	defer tb.mu.Unlock()
	if !strings.Contains(tb.fatal, "exited during start") {
		t.Fatalf("Restart of a node that never serves: fatal %q, want \"exited during start\" (an earlier process's line taken as this one's)", tb.fatal)
	}
}
