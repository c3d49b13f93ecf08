package builder

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// mountPoints are paths the build container's mounts create in the upper
// dir; they are not part of what a step built.
var mountPoints = map[string]bool{
	"proc": true, "sys": true, "dev": true, "etc/resolv.conf": true, "etc/hosts": true,
}

// keptXattrs are the extended attributes carried into layers.
var keptXattrs = []string{"security.capability"}

func clamp(t, epoch time.Time) time.Time {
	if t.After(epoch) {
		return epoch
	}
	return t.UTC()
}

// writeUpperTar writes the OCI layer of an overlay upper dir to w: entries
// sorted by name, overlay whiteouts (0/0 character devices) as .wh.<name>,
// opaque directories with .wh..wh..opq, hard links within the layer as tar
// links, mtimes clamped to epoch, uid/gid as they are, no owner names, no
// access or change times. The build container's mount points are left out.
func writeUpperTar(upper string, w io.Writer, epoch time.Time) error {
	tw := tar.NewWriter(w)
	links := map[[2]uint64]string{} // (dev, ino) -> first name
	whiteout := func(name string) *tar.Header {
		return &tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, ModTime: epoch, Format: tar.FormatPAX}
	}
	var walk func(dir, rel string) error
	walk = func(dir, rel string) error {
		ents, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		// os.ReadDir sorts by name.
		for _, e := range ents {
			name := path.Join(rel, e.Name())
			if mountPoints[name] {
				continue
			}
			full := filepath.Join(dir, e.Name())
			fi, err := os.Lstat(full)
			if err != nil {
				return err
			}
			st, ok := fi.Sys().(*syscall.Stat_t)
			if !ok {
				return fmt.Errorf("%s: no stat", full)
			}
			if fi.Mode()&fs.ModeCharDevice != 0 && st.Rdev == 0 {
				if err := tw.WriteHeader(whiteout(path.Join(rel, ".wh."+e.Name()))); err != nil {
					return err
				}
				continue
			}
			link := ""
			if fi.Mode()&fs.ModeSymlink != 0 {
				if link, err = os.Readlink(full); err != nil {
					return err
				}
			}
			h, err := tar.FileInfoHeader(fi, link)
			if err != nil {
				if fi.Mode()&(fs.ModeSocket|fs.ModeNamedPipe) != 0 {
					continue // sockets are not carried in layers
				}
				return fmt.Errorf("%s: %w", name, err)
			}
			h.Name = name
			h.Uid, h.Gid = int(st.Uid), int(st.Gid)
			h.Uname, h.Gname = "", ""
			h.ModTime, h.AccessTime, h.ChangeTime = clamp(fi.ModTime(), epoch), time.Time{}, time.Time{}
			h.Format = tar.FormatPAX
			h.PAXRecords = nil
			for _, x := range keptXattrs {
				if v, ok := getXattr(full, x); ok {
					if h.PAXRecords == nil {
						h.PAXRecords = map[string]string{}
					}
					h.PAXRecords["SCHILY.xattr."+x] = v
				}
			}
			if fi.Mode().IsRegular() && st.Nlink > 1 {
				id := [2]uint64{uint64(st.Dev), st.Ino}
				if first, ok := links[id]; ok {
					h.Typeflag, h.Linkname, h.Size = tar.TypeLink, first, 0
				} else {
					links[id] = name
				}
			}
			if fi.IsDir() {
				h.Name += "/"
			}
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			switch {
			case fi.IsDir():
				if isOpaque(full) {
					if err := tw.WriteHeader(whiteout(path.Join(name, ".wh..wh..opq"))); err != nil {
						return err
					}
				}
				if err := walk(full, name); err != nil {
					return err
				}
			case h.Typeflag == tar.TypeReg:
				f, err := os.Open(full)
				if err != nil {
					return err
				}
				_, err = io.Copy(tw, f)
				f.Close()
				if err != nil {
					return fmt.Errorf("%s: %w", name, err)
				}
			}
		}
		return nil
	}
	if err := walk(upper, ""); err != nil {
		return err
	}
	return tw.Close()
}

func isOpaque(dir string) bool {
	for _, attr := range []string{"trusted.overlay.opaque", "user.overlay.opaque"} {
		if v, ok := getXattr(dir, attr); ok && v == "y" {
			return true
		}
	}
	return false
}

func getXattr(p, attr string) (string, bool) {
	buf := make([]byte, 256)
	for {
		n, err := unix.Lgetxattr(p, attr, buf)
		if errors.Is(err, unix.ERANGE) && len(buf) < 64<<10 {
			buf = make([]byte, len(buf)*4)
			continue
		}
		if err != nil {
			return "", false
		}
		return string(buf[:n]), true
	}
}

// writeCopyLayer writes the layer of a copy step to w: a file's bytes at dst
// (mode 0644 or 0755), or a directory tar's entries under dst. Every entry is
// owned by root with its mtime at epoch; files are 0644 or 0755 and
// directories 0755. Parent directories of dst are not written (an existing
// directory keeps its owner and mode; a missing one is created 0755 when the
// layer is applied). tmpDir receives a spool file for a single file's bytes.
func writeCopyLayer(w io.Writer, content io.Reader, dst string, isDir bool, mode uint32, epoch time.Time, tmpDir string) error {
	tw := tar.NewWriter(w)
	rel := strings.TrimPrefix(path.Clean("/"+dst), "/")
	hdr := func(name string, typ byte, mode int64, size int64) *tar.Header {
		return &tar.Header{Name: name, Typeflag: typ, Mode: mode, Size: size, ModTime: epoch, Format: tar.FormatPAX}
	}
	if !isDir {
		if rel == "" {
			return fmt.Errorf("a file cannot replace /: %w", errdefs.ErrInvalidArgument)
		}
		// The size goes in the header before the bytes: spool them.
		spool, err := os.CreateTemp(tmpDir, "copy-src-*")
		if err != nil {
			return err
		}
		defer os.Remove(spool.Name())
		defer spool.Close()
		size, err := io.Copy(spool, content)
		if err != nil {
			return fmt.Errorf("read content: %w", err)
		}
		if _, err := spool.Seek(0, io.SeekStart); err != nil {
			return err
		}
		m := int64(0o644)
		if mode&0o111 != 0 {
			m = 0o755
		}
		if err := tw.WriteHeader(hdr(rel, tar.TypeReg, m, size)); err != nil {
			return err
		}
		if _, err := io.Copy(tw, spool); err != nil {
			return err
		}
		return tw.Close()
	}
	tr := tar.NewReader(content)
	wrote := false
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("directory content is not a valid tar: %v: %w", err, errdefs.ErrInvalidArgument)
		}
		name := path.Clean(strings.TrimPrefix(h.Name, "./"))
		if name == "." {
			continue
		}
		if path.IsAbs(name) || name == ".." || strings.HasPrefix(name, "../") {
			return fmt.Errorf("directory content: entry %q escapes the directory: %w", h.Name, errdefs.ErrInvalidArgument)
		}
		if strings.HasPrefix(path.Base(name), ".wh.") {
			return fmt.Errorf("directory content: entry %q has a whiteout name: %w", h.Name, errdefs.ErrInvalidArgument)
		}
		out := path.Join(rel, name)
		if rel == "" {
			out = name
		}
		switch h.Typeflag {
		case tar.TypeDir:
			err = tw.WriteHeader(hdr(out+"/", tar.TypeDir, 0o755, 0))
		case tar.TypeReg:
			m := int64(0o644)
			if h.Mode&0o111 != 0 {
				m = 0o755
			}
			if err = tw.WriteHeader(hdr(out, tar.TypeReg, m, h.Size)); err == nil {
				_, err = io.Copy(tw, contentReader{tr})
			}
		case tar.TypeSymlink:
			l := hdr(out, tar.TypeSymlink, 0o777, 0)
			l.Linkname = h.Linkname
			err = tw.WriteHeader(l)
		default:
			return fmt.Errorf("directory content: entry %q: type %q is not a file, directory or symlink: %w", h.Name, h.Typeflag, errdefs.ErrInvalidArgument)
		}
		if err != nil {
			return err
		}
		wrote = true
	}
	if !wrote && rel != "" {
		// An empty directory still makes dst exist.
		if err := tw.WriteHeader(hdr(rel+"/", tar.TypeDir, 0o755, 0)); err != nil {
			return err
		}
	}
	return tw.Close()
}

// contentReader marks errors reading uploaded content as the content's fault.
type contentReader struct{ r io.Reader }

func (c contentReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		err = fmt.Errorf("directory content is not a valid tar: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return n, err
}
