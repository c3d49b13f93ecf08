package daemon

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Limits are the node's resource defaults and bounds (the zero value gets
// the defaults below).
type Limits struct {
	// DefaultMemoryMB is the memory limit of a sandbox whose request gives
	// none (default api.DefaultMemoryMB, 1 GiB). A sandbox's disk (a tmpfs)
	// counts toward it.
	DefaultMemoryMB int64
	// BuildMemoryMB is the memory limit of an image build's RUN steps
	// (default DefaultBuildMemoryMB); their disk counts toward it too.
	BuildMemoryMB int64
	// LogMaxBytes caps a sandbox's console log (default DefaultLogMaxBytes);
	// LogRetention is how long the logs of ended sandboxes are kept
	// (default DefaultLogRetention).
	LogMaxBytes  int64
	LogRetention time.Duration
	// KeepStopped is how long a stopped sandbox's writable layer is kept
	// for a snapshot (default api.DefaultKeepStopped, 10 minutes; < 0:
	// never); KeepStoppedMB bounds the kept layers of one org (default
	// api.DefaultKeepStoppedMB): host memory no cgroup counts any more.
	KeepStopped   time.Duration
	KeepStoppedMB int64
	// nodeMemoryMB is the node's memory (from /proc/meminfo).
	nodeMemoryMB int64
}

// Defaults of Limits.
const (
	DefaultBuildMemoryMB = 4096
	DefaultLogMaxBytes   = 8 << 20
	DefaultLogRetention  = 7 * 24 * time.Hour
)

func (l *Limits) defaults() error {
	if l.DefaultMemoryMB == 0 {
		l.DefaultMemoryMB = api.DefaultMemoryMB
	}
	if l.BuildMemoryMB == 0 {
		l.BuildMemoryMB = DefaultBuildMemoryMB
	}
	if l.LogMaxBytes == 0 {
		l.LogMaxBytes = DefaultLogMaxBytes
	}
	if l.LogRetention == 0 {
		l.LogRetention = DefaultLogRetention
	}
	if l.KeepStoppedMB == 0 {
		l.KeepStoppedMB = api.DefaultKeepStoppedMB
	}
	if l.KeepStoppedMB < 0 {
		return fmt.Errorf("keep-stopped-mb %d: must not be negative: %w", l.KeepStoppedMB, errdefs.ErrInvalidArgument)
	}
	mem, err := nodeMemoryMB()
	if err != nil {
		return err
	}
	l.nodeMemoryMB = mem
	for _, f := range []struct {
		name string
		mb   int64
	}{{"default memory", l.DefaultMemoryMB}, {"build memory", l.BuildMemoryMB}} {
		if f.mb < 8 || f.mb > mem {
			return fmt.Errorf("%s %d MiB: want between 8 MiB and the node's memory (%d MiB): %w", f.name, f.mb, mem, errdefs.ErrInvalidArgument)
		}
	}
	if l.LogMaxBytes < 64<<10 {
		return fmt.Errorf("log max bytes %d: want at least 64 KiB: %w", l.LogMaxBytes, errdefs.ErrInvalidArgument)
	}
	if l.LogRetention < 0 {
		return fmt.Errorf("log retention %v: want a positive duration: %w", l.LogRetention, errdefs.ErrInvalidArgument)
	}
	return nil
}

// nodeMemoryMB is MemTotal from /proc/meminfo, in MiB.
func nodeMemoryMB() (int64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/meminfo: %q: %w", sc.Text(), err)
			}
			return kb >> 10, nil
		}
	}
	return 0, fmt.Errorf("/proc/meminfo: no MemTotal")
}
