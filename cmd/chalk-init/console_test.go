package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestConsoleCap: with --log-max the entrypoint's output reaches the log
// only through init, which keeps the log under the cap by moving it to the
// previous part; together they end with the newest output, contiguous. The
// entrypoint holds neither the log nor the previous part.
func TestConsoleCap(t *testing.T) {
	dir := t.TempDir()
	logf, err := os.OpenFile(filepath.Join(dir, "sb.log"), os.O_CREATE|os.O_RDWR|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	prev, err := os.OpenFile(filepath.Join(dir, "sb.log.1"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer prev.Close()
	const capB = 4096
	// 20000 lines (~108 KB) from the entrypoint, then what it can reach of
	// the host's files: its fds 1 and 3.
	script := `seq 1 20000; ls -l /proc/$$/fd/ | grep -c 'sb.log' >&2; echo done`
	cmd := initCmd(t, "--socket", filepath.Join(dir, "run", "init.sock"), "--log-max", fmt.Sprint(capB), "--log-prev-fd", "3", "--", "sh", "-c", script)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{prev}
	if err := cmd.Run(); err != nil {
		t.Fatalf("init: %v", err)
	}
	cur, _ := os.ReadFile(logf.Name())
	old, _ := os.ReadFile(prev.Name())
	if len(cur) > capB || len(old) > capB {
		t.Fatalf("log %d bytes, previous part %d: want each at most %d", len(cur), len(old), capB)
	}
	all := string(old) + string(cur)
	if !strings.HasSuffix(all, "19999\n20000\n0\ndone\n") {
		t.Fatalf("log does not end with the newest output (or the entrypoint held the log's fds): %q", all[max(0, len(all)-100):])
	}
	// Contiguous: every line after the first (maybe partial) one follows
	// the one before.
	lines := strings.Split(strings.TrimSuffix(all, "\n0\ndone\n"), "\n")[1:]
	for i := 1; i < len(lines); i++ {
		var a, b int
		fmt.Sscan(lines[i-1], &a)
		fmt.Sscan(lines[i], &b)
		if b != a+1 {
			t.Fatalf("gap in the log at line %d: %q then %q", i, lines[i-1], lines[i])
		}
	}
	if len(all) < capB {
		t.Fatalf("only %d bytes kept, want at least the cap (%d)", len(all), capB)
	}
}
