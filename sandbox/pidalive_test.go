package sandbox

import (
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// TestPidAlive: a running process is alive; once it exits unreaped (a
// zombie, as a sandbox's init whose parent died: runsc's state still says
// running then) or is gone, it is not, so Running does not report it.
func TestPidAlive(t *testing.T) {
	if !pidAlive(os.Getpid()) {
		t.Fatal("this process is not alive")
	}
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	deadline := time.Now().Add(10 * time.Second)
	for pidAlive(pid) { // until it exited: a zombie, not reaped yet
		if time.Now().After(deadline) {
			t.Fatal("an exited, unreaped process is still alive")
		}
		time.Sleep(10 * time.Millisecond) // polling the child's exit
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err != nil {
		t.Fatalf("the zombie is gone before it was reaped: %v", err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	if pidAlive(pid) || pidAlive(0) || pidAlive(-1) {
		t.Error("a reaped or invalid pid is alive")
	}
}
