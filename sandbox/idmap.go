package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// UserNS is the user namespace a sandbox joins (sandboxnet makes it, owning
// the sandbox's network namespace): ids 0..Size-1 inside are HostID.. on
// the host.
type UserNS struct {
	Path   string
	HostID uint32
	Size   uint32
}

// Image layers under a user namespace.
//
// The node cache extracts each layer once, with the ids of the image (root's
// files are uid 0 on disk), and every sandbox shares them. A sandbox whose
// root is host uid HostID must see those files as its own root's, so each
// lower dir is given to overlayfs through an idmapped mount (open_tree +
// mount_setattr(MOUNT_ATTR_IDMAP) with the sandbox's user namespace +
// move_mount, about 0.1 ms a layer; Linux ≥ 5.19 for overlayfs over
// idmapped layers): on-disk uid 0 reads as HostID, so inside as 0, and
// nothing is copied or chowned. The upper dir (the sandbox's own writes) is
// a plain directory owned by HostID; what the sandbox writes lands there
// with host ids in its range.

// idmapLowers mounts each dir of lowers, idmapped through the user
// namespace at usernsPath, at base/0, base/1, ... read-only and returns
// those mount points in the same order.
func idmapLowers(lowers []string, usernsPath, base string) ([]string, error) {
	ufd, err := unix.Open(usernsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open user namespace %s: %w", usernsPath, err)
	}
	defer unix.Close(ufd)
	if err := os.MkdirAll(base, 0o755); err != nil {
		return nil, err
	}
	out := make([]string, 0, len(lowers))
	for i, l := range lowers {
		dst := filepath.Join(base, strconv.Itoa(i))
		if err := os.Mkdir(dst, 0o755); err != nil {
			return out, err
		}
		if err := idmapMount(l, dst, ufd); err != nil {
			return out, err
		}
		out = append(out, dst)
	}
	return out, nil
}

func idmapMount(src, dst string, usernsFD int) error {
	tfd, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return fmt.Errorf("open_tree %s: %w", src, err)
	}
	defer unix.Close(tfd)
	attr := &unix.MountAttr{
		Attr_set:  unix.MOUNT_ATTR_IDMAP | unix.MOUNT_ATTR_RDONLY,
		Userns_fd: uint64(usernsFD),
	}
	if err := unix.MountSetattr(tfd, "", unix.AT_EMPTY_PATH, attr); err != nil {
		return fmt.Errorf("idmap %s (needs Linux ≥ 5.12 and a filesystem that supports idmapped mounts): %w", src, err)
	}
	if err := unix.MoveMount(tfd, "", unix.AT_FDCWD, dst, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount %s to %s: %w", src, dst, err)
	}
	return nil
}

// unmountLowers detaches the idmapped lower mounts under base.
func unmountLowers(base string) error {
	ents, err := os.ReadDir(base)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	var errs []error
	for _, e := range ents {
		p := filepath.Join(base, e.Name())
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}
