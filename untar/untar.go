// Package untar extracts tar archives that an API user or a sandbox controls
// into a host directory, and never writes outside it.
//
// Every host write resolves its parent with openat2(2) relative to a handle on
// the root, with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS|
// RESOLVE_NO_XDEV: the kernel refuses any path that leaves the root, passes
// through a symlink (even one pointing inside) or crosses a mount. The last
// component is created with O_EXCL|O_NOFOLLOW, mkdirat, symlinkat or linkat
// relative to that parent handle, so a link planted by an earlier entry (or by
// anyone racing the extraction) is never followed by the host.
//
// What is kept: directories (0755), regular files (0644, or 0755 when any
// execute bit was set: setuid, setgid and sticky bits are dropped), symlinks
// with their target verbatim (absolute or relative; they are only ever
// resolved later inside a sandbox's mount namespace), and hard links to
// regular files already extracted under the root. Device nodes, fifos and
// unknown entry types are refused, as are entries with absolute or ".." names
// and archives past Limits. Refusals wrap errdefs.ErrInvalidArgument (limits:
// errdefs.ErrResourceExhausted); on error the caller removes the directory.
package untar

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Limits bound one archive. Zero fields get the defaults.
type Limits struct {
	MaxBytes   int64 // total size of regular files; default DefaultMaxBytes
	MaxEntries int   // entries of any type; default DefaultMaxEntries
}

// Defaults for Limits.
const (
	DefaultMaxBytes   = 4 << 30
	DefaultMaxEntries = 100_000
)

// resolve is how every path below the root is opened: never out of the root,
// never through a symlink, never across a mount.
const resolve = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV

// Extract reads the tar stream r into dir, an existing directory.
func Extract(r io.Reader, dir string, lim Limits) error {
	if lim.MaxBytes <= 0 {
		lim.MaxBytes = DefaultMaxBytes
	}
	if lim.MaxEntries <= 0 {
		lim.MaxEntries = DefaultMaxEntries
	}
	root, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("extract into %s: %w", dir, err)
	}
	defer unix.Close(root)
	x := &extractor{root: root, lim: lim}
	tr := tar.NewReader(r)
	for n := 0; ; n++ {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("tar: %v: %w", err, errdefs.ErrInvalidArgument)
		}
		if n >= lim.MaxEntries {
			return fmt.Errorf("tar: more than %d entries: %w", lim.MaxEntries, errdefs.ErrResourceExhausted)
		}
		if err := x.entry(h, tr); err != nil {
			return fmt.Errorf("tar entry %q: %w", h.Name, err)
		}
	}
}

type extractor struct {
	root    int
	lim     Limits
	written int64
}

// clean returns name relative to the root, or an error for names that leave it.
func clean(name string) (string, error) {
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("NUL in name: %w", errdefs.ErrInvalidArgument)
	}
	if path.IsAbs(name) {
		return "", fmt.Errorf("absolute name: %w", errdefs.ErrInvalidArgument)
	}
	c := path.Clean(name)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", fmt.Errorf("name leaves the directory: %w", errdefs.ErrInvalidArgument)
	}
	return c, nil
}

func (x *extractor) entry(h *tar.Header, r io.Reader) error {
	name, err := clean(h.Name)
	if err != nil {
		return err
	}
	switch h.Typeflag {
	case tar.TypeDir:
		if name == "." {
			return nil
		}
		fd, err := x.mkdirAll(name)
		if err != nil {
			return err
		}
		return unix.Close(fd)
	case tar.TypeReg, tar.TypeChar, tar.TypeBlock, tar.TypeFifo, tar.TypeSymlink, tar.TypeLink:
	default:
		return fmt.Errorf("entry type %q is not supported: %w", h.Typeflag, errdefs.ErrInvalidArgument)
	}
	if h.Typeflag == tar.TypeChar || h.Typeflag == tar.TypeBlock || h.Typeflag == tar.TypeFifo {
		return fmt.Errorf("device nodes and fifos are refused: %w", errdefs.ErrInvalidArgument)
	}
	if name == "." {
		return fmt.Errorf("not a directory at the root: %w", errdefs.ErrInvalidArgument)
	}
	parent, err := x.mkdirAll(path.Dir(name))
	if err != nil {
		return err
	}
	defer unix.Close(parent)
	base := path.Base(name)
	switch h.Typeflag {
	case tar.TypeReg:
		return x.file(parent, base, h, r)
	case tar.TypeSymlink:
		if h.Linkname == "" || strings.IndexByte(h.Linkname, 0) >= 0 {
			return fmt.Errorf("bad symlink target: %w", errdefs.ErrInvalidArgument)
		}
		return replace(parent, base, func() error { return unix.Symlinkat(h.Linkname, parent, base) })
	default: // tar.TypeLink
		target, err := clean(h.Linkname)
		if err != nil {
			return fmt.Errorf("hard link target: %w", err)
		}
		src, err := unix.Openat2(x.root, target, &unix.OpenHow{Flags: unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC, Resolve: resolve})
		if err != nil {
			return fmt.Errorf("hard link target %q: %w", h.Linkname, refusal(err))
		}
		defer unix.Close(src)
		var st unix.Stat_t
		if err := unix.Fstat(src, &st); err != nil {
			return err
		}
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			return fmt.Errorf("hard link target %q is not a regular file: %w", h.Linkname, errdefs.ErrInvalidArgument)
		}
		return replace(parent, base, func() error { return unix.Linkat(src, "", parent, base, unix.AT_EMPTY_PATH) })
	}
}

// file writes a regular file's content, bounded by the archive's byte budget.
func (x *extractor) file(parent int, base string, h *tar.Header, r io.Reader) error {
	mode := uint32(0o644)
	if h.Mode&0o111 != 0 {
		mode = 0o755
	}
	var fd int
	err := replace(parent, base, func() (err error) {
		fd, err = unix.Openat(parent, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode)
		return err
	})
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), base)
	defer f.Close()
	left := x.lim.MaxBytes - x.written
	n, err := io.Copy(f, io.LimitReader(r, left+1))
	x.written += n
	if err != nil {
		return err
	}
	if n > left {
		return fmt.Errorf("content larger than %d bytes in all: %w", x.lim.MaxBytes, errdefs.ErrResourceExhausted)
	}
	// The umask may have taken bits off; set exactly what we promised.
	return f.Chmod(os.FileMode(mode))
}

// replace runs create; if the name exists (a duplicate entry), the old
// non-directory is removed first. Directories are never replaced.
func replace(parent int, base string, create func() error) error {
	err := create()
	if !errors.Is(err, unix.EEXIST) {
		return err
	}
	if err := unix.Unlinkat(parent, base, 0); err != nil {
		return fmt.Errorf("replace existing entry: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return create()
}

// mkdirAll opens directory rel below the root (O_PATH), making missing
// components 0755 one at a time, each relative to its parent's handle.
func (x *extractor) mkdirAll(rel string) (int, error) {
	how := &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC, Resolve: resolve}
	fd, err := unix.Openat2(x.root, rel, how)
	if err == nil || !errors.Is(err, unix.ENOENT) {
		return fd, refusal(err)
	}
	cur, err := unix.Dup(x.root)
	if err != nil {
		return -1, err
	}
	for _, c := range strings.Split(rel, "/") {
		next, err := unix.Openat2(cur, c, how)
		if errors.Is(err, unix.ENOENT) {
			if err := unix.Mkdirat(cur, c, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
				unix.Close(cur)
				return -1, err
			}
			next, err = unix.Openat2(cur, c, how)
		}
		unix.Close(cur)
		if err != nil {
			return -1, refusal(err)
		}
		cur = next
	}
	return cur, nil
}

// refusal classifies what openat2 refused: a path through a symlink, out of
// the root, across a mount or through a non-directory is the archive's fault.
func refusal(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ELOOP):
		return fmt.Errorf("path passes through a symlink: %w", errdefs.ErrInvalidArgument)
	case errors.Is(err, unix.EXDEV):
		return fmt.Errorf("path leaves the directory: %w", errdefs.ErrInvalidArgument)
	case errors.Is(err, unix.ENOTDIR):
		return fmt.Errorf("path passes through a non-directory: %w", errdefs.ErrInvalidArgument)
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("no such entry: %w", errdefs.ErrInvalidArgument)
	}
	return err
}
