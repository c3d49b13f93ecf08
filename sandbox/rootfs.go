package sandbox

import (
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// readInRoot reads the regular file name (relative to root, e.g.
// "etc/passwd") of an image's rootfs, which an API user controls: links
// resolve as they would inside the sandbox, with root as "/"
// (openat2 RESOLVE_IN_ROOT), never to a host file, and at most max bytes
// are read (so a link to /dev/zero, or a huge file, cannot exhaust chalkd).
func readInRoot(root, name string, max int64) ([]byte, error) {
	dir, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(dir)
	fd, err := unix.Openat2(dir, name, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_NONBLOCK | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV,
	})
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("/%s is not a regular file: %w", name, errdefs.ErrInvalidArgument)
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("/%s is larger than %d bytes: %w", name, max, errdefs.ErrInvalidArgument)
	}
	return b, nil
}
