package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// dataDirModes are the modes of DataDir's subdirectories, set at every start
// (so an install made by an older chalkd, with 0755 directories, is fixed).
// Uploads, layers, logs, the registry and tokens are private to chalkd: a
// local user must not read another user's content. Only the sandboxes' state
// dir is searchable (0711, not listable): a sandbox's root, an unprivileged
// host uid in a user namespace, must reach its own rootfs there (runc
// pivots into it after joining the namespace; each sandbox's own dir is
// 0710 to its range). Bind-mount sources (mount uploads, identity files) are
// opened by runc on the host side, so they can stay 0700. bin/ (chalk-init
// and chalk) is 0755 by stageBinaries.
var dataDirModes = map[string]os.FileMode{
	"blobs":          0o700,
	"mounts":         0o700,
	"cache":          0o700,
	"logs":           0o700,
	"registry":       0o700,
	"identity":       0o700,
	"identity-files": 0o700,
	"prestarted":     0o700,
	"teardown":       0o700,
	"sandboxes":      0o711,
}

// restrictDataDir makes (or fixes) DataDir's subdirectories with
// dataDirModes, and DataDir itself 0700 when no sandbox runs in a user
// namespace (Start makes it 0711 otherwise).
func restrictDataDir(dataDir string, userns bool) error {
	if !userns {
		if err := os.Chmod(dataDir, 0o700); err != nil {
			return fmt.Errorf("data dir: %w", err)
		}
	}
	for name, mode := range dataDirModes {
		p := filepath.Join(dataDir, name)
		if err := os.Mkdir(p, mode); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("data dir: %w", err)
		}
		if err := os.Chmod(p, mode); err != nil {
			return fmt.Errorf("data dir: %w", err)
		}
	}
	return nil
}

// identityFilesTmpfs puts DataDir/identity-files (one identity dir per
// sandbox: its token files, written at every create and refresh, removed
// at its end) on a tmpfs of its own when it is on another file system and
// empty. Nothing in it outlives the host's boot (no sandbox does), and on
// a disk file system each create's dirs and token file cost its journal:
// a create + remove of a small file took 0.56-0.59 ms of CPU on the CI
// VM's ext4, 0.02 ms on a tmpfs (issue #18 round 6). The mount outlives
// chalkd (a restart finds it and its sandboxes' dirs, bind-mounted by
// path, in place); a dir that is not empty is left as it is (an older
// chalkd's sandboxes have theirs bind-mounted from the disk), and so is
// one on a tmpfs already. A mount that fails is logged and the disk used.
func identityFilesTmpfs(log *slog.Logger, dataDir string) {
	dir := filepath.Join(dataDir, "identity-files")
	mounted, err := tmpfsIfEmpty(dir, "chalk-identity", dataDirModes["identity-files"], identityTmpfsSize)
	if err != nil {
		log.Warn("identity files stay on the data dir's file system", "dir", dir, "err", err)
		return
	}
	if mounted {
		log.Debug("identity files on a tmpfs", "dir", dir)
	}
}

// nsFilesTmpfs puts RunDir/netns and RunDir/userns (the sandboxes' network
// and user namespace files: empty files, each the mount point of a
// namespace's bind, made at every create or spare and removed at the
// sandbox's end) on a tmpfs each when they are on a disk file system and
// empty, as identityFilesTmpfs does: on the CI VM /run is the root's ext4,
// and in a burst of 50 creates ext4's inode allocator (its search through
// the groups for an inode not recently deleted) was about half of chalkd's
// CPU (issue #18 rounds 7 and 7b). A namespace outlives neither the host's
// boot nor its bind, so nothing lost there at a reboot was not lost
// before; the mounts outlive chalkd, and a restart finds them and its
// sandboxes' binds in place. The modes are sandboxnet's (0755: the dirs
// hold no secret, runc opens the files as root). Without user namespaces
// the userns dir is not made.
func nsFilesTmpfs(log *slog.Logger, runDir string, userns bool) {
	dirs := []string{"netns"}
	if userns {
		dirs = append(dirs, "userns")
	}
	for _, name := range dirs {
		dir := filepath.Join(runDir, name)
		if err := os.MkdirAll(dir, nsDirMode); err != nil {
			log.Warn("namespace files stay on the run dir's file system", "dir", dir, "err", err)
			continue
		}
		mounted, err := tmpfsIfEmpty(dir, "chalk-"+name, nsDirMode, nsTmpfsSize)
		if err != nil {
			log.Warn("namespace files stay on the run dir's file system", "dir", dir, "err", err)
			continue
		}
		if mounted {
			log.Debug("namespace files on a tmpfs", "dir", dir)
		}
	}
}

// nsDirMode is the mode sandboxnet makes its netns and userns dirs with.
const nsDirMode = 0o755

// nsTmpfsSize bounds the namespace files' tmpfs: its files are empty (a
// namespace's bind is a mount on them, not their content), so what it holds
// is only its inodes and dirents, which a tmpfs does not count in size;
// 1 MiB is for nothing but a mistake's writes.
const nsTmpfsSize = 1 << 20

// identityTmpfsSize bounds the identity-files tmpfs: 64 KiB (16 pages: a
// sandbox's token and federation files, the node's files.json, a refresh's
// temporary file) for each of the most slots a node can have (sandboxnet:
// 16 bits). The tmpfs is shared by every sandbox of every org and chalkd
// writes a few pages into it per sandbox, so a smaller bound is a capacity
// of its own below the node's: the first bound, 64 MiB, held 16,384 pages,
// which the sandboxes of one org without a quota could fill (~16k sandboxes
// with only the API token file, ~4k with AWS federation on a fleet node),
// after which every org's creates and token refreshes failed. Pages are
// used only as written: what is written per sandbox is bounded by chalkd
// (noderpc.MaxIdentityFiles on a node), never by the sandbox, which sees
// its dir read-only.
const identityTmpfsSize = 64 << 10 << 16

// tmpfsIfEmpty mounts a tmpfs (mode, at most size bytes, nosuid, nodev) on
// dir if dir is empty and not on a tmpfs already; it reports whether it
// did. A tmpfs mounted there smaller than size (an older chalkd's) is
// grown to size, keeping its files.
func tmpfsIfEmpty(dir, source string, mode os.FileMode, size int64) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false, err
	}
	if st.Type == unix.TMPFS_MAGIC {
		if int64(st.Blocks)*st.Bsize < size {
			// Only a mount point is remounted (EINVAL for a dir on its
			// parent's tmpfs, which is then left as it is).
			err := unix.Mount(source, dir, "tmpfs", unix.MS_REMOUNT|unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%d", size))
			if err != nil && !errors.Is(err, unix.EINVAL) {
				return false, fmt.Errorf("grow the tmpfs on %s: %w", dir, err)
			}
		}
		return false, nil
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false, err
	}
	if len(ents) > 0 {
		return false, nil
	}
	opts := fmt.Sprintf("mode=%o,size=%d", mode.Perm(), size)
	// Not noexec: runc binds a sandbox's identity dir read-only, nosuid
	// and nodev from inside the sandbox's user namespace, where a flag of
	// the source mount it does not repeat is locked (EPERM).
	if err := unix.Mount(source, dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		return false, fmt.Errorf("mount a tmpfs on %s: %w", dir, err)
	}
	return true, nil
}
