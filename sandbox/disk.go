package sandbox

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Disk quota on a sandbox's writable layer.
//
// The data directory's filesystem (ext4 on these machines, mounted without
// prjquota) has no per-directory quota, so each sandbox's directory
// (Config.StateDir/<id>: the overlay upper and work dirs, its bundle, run and
// etc files) is its own size-limited tmpfs. Creating and removing one costs
// tens of microseconds; the alternative measured here, an ext4 image on a loop
// device per sandbox (copied from a pre-formatted sparse template), costs
// ~20 ms at create and ~50 ms at destroy, over 10 % of time-to-interactive.
//
// What a tmpfs means for users: its pages are memory. They are charged to the
// memory cgroup of the process that writes them, i.e. to the sandbox's own
// memory limit, and are never swapped (these nodes have no swap). A sandbox
// therefore writes at most min(disk quota, memory limit minus what its
// processes use); past the quota writes fail with ENOSPC, past the memory
// limit the writer is OOM-killed (the files stay until deleted). The node is
// protected either way: no sandbox can fill the data directory's disk.

// Disk backends (Config.Disk).
const (
	DiskTmpfs = "tmpfs" // default: the sandbox directory is a tmpfs of Spec.DiskMB
	DiskNone  = "none"  // no quota: the sandbox directory is a plain directory
)

// DefaultDiskMB is the writable-layer quota when neither Spec.DiskMB nor
// Config.DefaultDiskMB says otherwise.
const DefaultDiskMB = 10 << 10

// MaxDiskMB bounds Spec.DiskMB (1 TiB).
const MaxDiskMB = 1 << 20

// diskMB is the quota of a sandbox: the spec's, else the node's default.
func (r *Runtime) diskMB(sp Spec) (int64, error) {
	mb := sp.DiskMB
	if mb == 0 {
		mb = r.cfg.DefaultDiskMB
	}
	if mb < 1 || mb > MaxDiskMB {
		return 0, fmt.Errorf("sandbox %q disk %d MiB: must be between 1 and %d: %w", sp.ID, mb, MaxDiskMB, errdefs.ErrInvalidArgument)
	}
	return mb, nil
}

// makeDir creates the sandbox directory dir with a quota of mb MiB.
func (r *Runtime) makeDir(dir string, mb int64) error {
	if err := os.Mkdir(dir, 0o711); err != nil {
		return err
	}
	if r.cfg.Disk == DiskNone {
		return nil
	}
	data := fmt.Sprintf("size=%dm,nr_inodes=%d,mode=0711", mb, diskInodes(mb))
	if err := unix.Mount("chalk-disk", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		return fmt.Errorf("mount the sandbox's disk (tmpfs %s) on %s: %w", data, dir, err)
	}
	return nil
}

// SetDiskMB changes the writable-layer quota of a running sandbox (a tmpfs
// remount: what is stored stays; a quota below the usage is refused by
// the kernel). A no-op without quotas (DiskNone).
func (r *Runtime) SetDiskMB(id string, mb int64) error {
	mb, err := r.diskMB(Spec{ID: id, DiskMB: mb})
	if err != nil || r.cfg.Disk == DiskNone {
		return err
	}
	data := fmt.Sprintf("size=%dm,nr_inodes=%d", mb, diskInodes(mb))
	if err := unix.Mount("chalk-disk", r.Dir(id), "tmpfs", unix.MS_REMOUNT|unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		return fmt.Errorf("sandbox %q: resize its disk (tmpfs %s): %w", id, data, err)
	}
	return nil
}

// diskInodes is the inode limit of a quota of mb MiB: one per 4 KiB (at
// least 64k), so inodes cannot be exhausted much faster than bytes;
// tmpfs's own default is half of RAM's pages.
func diskInodes(mb int64) int64 { return max(mb*256, 65536) }

// unmountDir removes the quota filesystem of dir (with the overlay still on
// it, if any). Not mounted is not an error.
func unmountDir(dir string) error {
	err := unix.Unmount(dir, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount the sandbox's disk %s: %w", dir, err)
	}
	return nil
}

// DiskUsage reports the bytes used and the quota of sandbox id's writable
// layer (both 0 when the node runs without quotas).
func (r *Runtime) DiskUsage(id string) (used, quota int64, err error) {
	if r.cfg.Disk == DiskNone {
		return 0, 0, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(r.Dir(id), &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return 0, 0, fmt.Errorf("sandbox %q: %w", id, errdefs.ErrNotFound)
		}
		return 0, 0, err
	}
	if st.Type != unix.TMPFS_MAGIC {
		return 0, 0, fmt.Errorf("sandbox %q has no disk quota mounted: %w", id, errdefs.ErrFailedPrecondition)
	}
	bs := int64(st.Bsize)
	return (int64(st.Blocks) - int64(st.Bfree)) * bs, int64(st.Blocks) * bs, nil
}
