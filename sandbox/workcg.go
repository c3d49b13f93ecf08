package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// The workload's pids cgroup.
//
// Init shares its sandbox's pids limit with everything in the sandbox, and
// a Go program that cannot make a thread when it needs one dies of it (and
// with init, the sandbox). So on runc, where the pids controller is on
// cgroup v1, every process init starts begins in a child of the sandbox's
// pids cgroup, WorkloadCgroup, whose pids.max is InitPidsHeadroom below the
// sandbox's: a fork bomb fills the child, and init still has
// InitPidsHeadroom pids for threads. The host makes the child before runc
// starts init and hands init the child's `tasks` file, open for writing
// (init moves the one thread that forks into it: cmd/chalk-init,
// procapi.Reaper.StartInCgroup). The sandbox cannot move a process out of
// the child: its cgroupfs is mounted read-only, in a cgroup namespace, and
// owned by the host's root. Without the child (gVisor, cgroup v2, a pids
// limit below 2×InitPidsHeadroom) init makes its threads ahead instead.

// WorkloadCgroup is the name of the workload's child of a sandbox's pids cgroup.
const WorkloadCgroup = "workload"

// InitPidsHeadroom is how many pids of the sandbox's limit the workload
// cannot take: what init has for its threads (5-6 when idle).
const InitPidsHeadroom = 32

// pidsV1 is the cgroup v1 pids hierarchy's mount point.
const pidsV1 = "/sys/fs/cgroup/pids"

// workloadTasks makes the workload's pids cgroup of sandbox id, with the
// sandbox's limit pids less InitPidsHeadroom, and returns its tasks file
// open for writing; nil, and no error, where there is none (see above).
func (r *Runtime) workloadTasks(id string, pids int64) (*os.File, error) {
	if r.cfg.Runtime != RuntimeRunc || pids < 2*InitPidsHeadroom {
		return nil, nil
	}
	if _, err := os.Stat(filepath.Join(pidsV1, "tasks")); err != nil {
		return nil, nil // no v1 pids hierarchy
	}
	dir := filepath.Join(pidsV1, r.cgroupPath(id), WorkloadCgroup)
	// runc makes the sandbox's cgroup (mkdir -p) and sets its limit.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("workload pids cgroup: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "pids.max"), []byte(strconv.FormatInt(pids-InitPidsHeadroom, 10)), 0); err != nil {
		return nil, fmt.Errorf("workload pids cgroup: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "tasks"), os.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("workload pids cgroup: %w", err)
	}
	return f, nil
}

// removeCgroupDir removes the (leaf, but for the workload's child) cgroup
// at p; it is removable once its tasks have exited, so retry briefly.
func removeCgroupDir(p string) error {
	if err := removeLeafCgroup(filepath.Join(p, WorkloadCgroup)); err != nil {
		return err
	}
	return removeLeafCgroup(p)
}

func removeLeafCgroup(p string) error {
	for attempt := 0; ; attempt++ {
		err := os.Remove(p)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || attempt >= 50 {
			return err
		}
		time.Sleep(10 * time.Millisecond) // until its tasks have exited
	}
}
