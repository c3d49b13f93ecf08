package chalktest

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// TestBinRemovedAtExit: the directory Bin builds the binaries in is removed
// when the test binary exits through Main (this test binary run again, its
// build faked). Before, every test binary left a /tmp/chalktest-bin-*
// behind. One named by $CHALK_TEST_BIN is never removed.
func TestBinRemovedAtExit(t *testing.T) {
	if os.Getenv("CHALKTEST_BIN_HELPER") == "1" {
		buildBin = func(_, out, _ string) error { return os.WriteFile(out, []byte("#!/bin/sh\n"), 0o755) }
		dir := Bin(t)
		if _, err := os.Stat(filepath.Join(dir, "chalkd")); err != nil {
			t.Fatal(err)
		}
		os.Stdout.WriteString("bin=" + dir + "\n")
		return
	}
	run := func(env ...string) string {
		t.Helper()
		cmd := exec.Command(os.Args[0], "-test.run=^TestBinRemovedAtExit$", "-test.v")
		cmd.Env = append(slices.DeleteFunc(os.Environ(), func(e string) bool { return strings.HasPrefix(e, "CHALK_TEST_BIN=") }),
			append(env, "CHALKTEST_BIN_HELPER=1")...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("test binary: %v\n%s", err, out)
		}
		m := regexp.MustCompile(`(?m)^bin=(.*)$`).FindSubmatch(out)
		if m == nil {
			t.Fatalf("no bin= line:\n%s", out)
		}
		return string(m[1])
	}
	dir := run()
	if !strings.Contains(filepath.Base(dir), "chalktest-bin-") {
		t.Fatalf("Bin built in %q, want a chalktest-bin-* directory", dir)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		_ = os.RemoveAll(dir)
		t.Fatalf("%s is still there after the test binary exited (%v)", dir, err)
	}
	given := t.TempDir()
	if err := os.WriteFile(filepath.Join(given, "chalkd"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got := run("CHALK_TEST_BIN=" + given); got != given {
		t.Fatalf("Bin with $CHALK_TEST_BIN=%s: %s", given, got)
	}
	if _, err := os.Stat(given); err != nil {
		t.Fatalf("$CHALK_TEST_BIN's directory removed: %v", err)
	}
}
