package sandbox

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestRuncFromSealedCopy: under runc the Runtime runs runc from a memfd
// holding the host's runc with exactly the seals runc takes as its own
// clone (so runc makes no copy per start), which no one can write, grow,
// shrink or unseal; one copy per process; a sandbox starts and runs from it.
func TestRuncFromSealedCopy(t *testing.T) {
	r := testRuntime(t, Config{})
	host, err := exec.LookPath("runc")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(r.runc.Command, "/proc/") {
		t.Fatalf("runc runs from %q, want a sealed copy's /proc path", r.runc.Command)
	}
	f, err := os.OpenFile(r.runc.Command, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
	if err != nil {
		t.Fatalf("runc's copy is not a memfd: %v", err)
	}
	if seals != runcSeals {
		t.Fatalf("runc's copy has seals %#x, want exactly %#x (runc copies itself otherwise)", seals, runcSeals)
	}
	got, err := os.ReadFile(r.runc.Command)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(host)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("runc's copy (%d bytes) differs from %s (%d bytes)", len(got), host, len(want))
	}
	// Not writable through any path: the seals hold against root.
	if w, err := os.OpenFile(r.runc.Command, os.O_WRONLY, 0); err == nil {
		_, werr := w.Write([]byte("x"))
		w.Close()
		if werr == nil {
			t.Fatal("wrote to runc's sealed copy")
		}
	}
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, 0); err == nil {
		// F_SEAL_SEAL: adding (even no) seals fails.
		t.Fatal("runc's copy accepts seals: F_SEAL_SEAL missing")
	}
	if r2 := testRuntime(t, Config{}); r2.runc.Command != r.runc.Command {
		t.Fatalf("a second Runtime made another copy (%q, %q)", r2.runc.Command, r.runc.Command)
	}

	layer := busyboxLayer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	startSandbox(t, r, Spec{ID: "sealed-runc", LowerDirs: []string{layer}})
	if code, out := run(t, r, "sealed-runc", "echo", "ok"); code != 0 || !strings.Contains(out, "ok") {
		t.Fatalf("exec in a sandbox started from the sealed copy: %d %q", code, out)
	}
	if err := r.Destroy(ctx, "sealed-runc"); err != nil {
		t.Fatal(err)
	}
}
