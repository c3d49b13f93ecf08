package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// ownChalkd is a chalkd started for this run (-own): in a network
// namespace, data dir and cgroup parent of its own, as the e2e tests start
// theirs, so a run measures the tree's binaries beside the host's chalkd and
// beside other runs without sharing a daemon with them.
type ownChalkd struct {
	h            *harness
	client       *chalkcompute.Client
	pidFile      string // chalkd's pid, for its RSS and CPU
	cgroupParent string
	netns        string
}

// startOwn starts the chalkd with extra flags (space-separated; "-" for none).
func startOwn(flags string) *ownChalkd {
	useTreeBin()
	h := &harness{}
	atFail = h.close
	var args []string
	if flags != "-" {
		args = strings.Fields(flags)
	}
	var n *chalktest.Node
	func() {
		defer func() {
			if r := recover(); r != nil {
				s, ok := r.(harnessStop)
				if !ok {
					panic(r)
				}
				fail(fmt.Errorf("own chalkd: %s", s.msg))
			}
		}()
		n = chalktest.Start(h, args...)
	}()
	pidFile := filepath.Join(h.TempDir(), "chalkd.pid")
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(n.Pid())), 0o600); err != nil {
		fail(err)
	}
	fmt.Fprintf(os.Stderr, "chalkbench: own chalkd (pid %d, netns %s, flags %q)\n", n.Pid(), n.Netns, args)
	return &ownChalkd{h: h, client: n.Client(), pidFile: pidFile, cgroupParent: n.Cgroup, netns: n.Netns}
}

func (d *ownChalkd) close() {
	atFail = nil
	d.h.close()
}

// useTreeBin points internal/chalktest at ./bin (scripts/build.sh) unless
// $CHALK_TEST_BIN names the binaries.
func useTreeBin() {
	if os.Getenv("CHALK_TEST_BIN") != "" {
		return
	}
	if abs, err := filepath.Abs("bin"); err == nil {
		if _, err := os.Stat(filepath.Join(abs, "chalkd")); err == nil {
			os.Setenv("CHALK_TEST_BIN", abs)
		}
	}
}
