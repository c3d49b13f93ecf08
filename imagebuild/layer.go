package imagebuild

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"golang.org/x/sys/unix"
)

// epoch is SOURCE_DATE_EPOCH for layers: every mtime is clamped to it.
var epoch = time.Unix(0, 0).UTC()

// excluded are paths the runtime creates as mount points in a build
// container's upper dir; they are not part of what a step built.
var excluded = map[string]bool{
	".chalk": true, "etc/resolv.conf": true, "etc/hosts": true, "etc/hostname": true,
	"run/chalk": true, "usr/local/bin/chalk": true, "proc": true, "sys": true, "dev": true,
}

// header returns a reproducible tar header.
// idShift maps host ids in [base, base+size) back to the ids a build saw in
// its user namespace (the zero value maps nothing).
type idShift struct{ base, size uint32 }

func (s idShift) id(hostID uint32) int {
	if s.size > 0 && hostID >= s.base && hostID-s.base < s.size {
		return int(hostID - s.base)
	}
	return int(hostID)
}

func header(name string, fi fs.FileInfo, link string, shift idShift) (*tar.Header, error) {
	h, err := tar.FileInfoHeader(fi, link)
	if err != nil {
		return nil, err
	}
	h.Name = name
	h.Uname, h.Gname = "", ""
	h.ModTime, h.AccessTime, h.ChangeTime = epoch, time.Time{}, time.Time{}
	h.Format = tar.FormatPAX
	h.PAXRecords = nil
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		h.Uid, h.Gid = shift.id(st.Uid), shift.id(st.Gid)
	}
	if fi.IsDir() && !strings.HasSuffix(h.Name, "/") {
		h.Name += "/"
	}
	return h, nil
}

// diffUpper writes the OCI layer tar of an overlay upper dir: entries sorted,
// overlay whiteouts (0/0 character devices) become .wh. files, opaque
// directories get .wh..wh..opq, mtimes are clamped and owner names dropped,
// and host ids in the build's user namespace range are shifted back.
func diffUpper(upper string, shift idShift, w io.Writer) error {
	return diffUpperExcluding(upper, shift, nil, false, w)
}

// diffUpperExcluding is diffUpper leaving out the paths in extra (relative,
// cleaned, like the keys of excluded) as well; with stripSetID the
// setuid/setgid bits are dropped.
//
// The files' contents in the layer are at most the size of the upper's
// filesystem (the sandbox's or the build step's disk, a tmpfs): a sparse
// file, or hard links to one file, take nothing or one copy there, and
// would be written whole, each time, into the layer (a `truncate -s 1T`
// made a terabyte of zeros in chalkd's memory for a build step, on the
// node's disk for a snapshot).
func diffUpperExcluding(upper string, shift idShift, extra map[string]bool, stripSetID bool, w io.Writer) error {
	var sfs unix.Statfs_t
	if err := unix.Statfs(upper, &sfs); err != nil {
		return fmt.Errorf("upper dir: %w", err)
	}
	budget := int64(sfs.Blocks) * sfs.Bsize
	if sfs.Blocks == 0 {
		budget = math.MaxInt64 // a tmpfs without a size (chalkd always sets one)
	}
	tw := tar.NewWriter(w)
	var walk func(dir, rel string) error
	walk = func(dir, rel string) error {
		ents, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		sort.Slice(ents, func(i, j int) bool { return ents[i].Name() < ents[j].Name() })
		for _, e := range ents {
			name := path.Join(rel, e.Name())
			if excluded[name] || extra[name] {
				continue
			}
			if strings.HasPrefix(e.Name(), ".wh.") {
				// A file the container named like a whiteout would become
				// one in the layer: it is not carried.
				continue
			}
			full := filepath.Join(dir, e.Name())
			fi, err := os.Lstat(full)
			if err != nil {
				return err
			}
			st, _ := fi.Sys().(*syscall.Stat_t)
			switch {
			case fi.Mode()&fs.ModeCharDevice != 0 && st != nil && st.Rdev == 0:
				wh := &tar.Header{Name: path.Join(rel, ".wh."+e.Name()), Typeflag: tar.TypeReg, Mode: 0o644, ModTime: epoch, Format: tar.FormatPAX}
				if err := tw.WriteHeader(wh); err != nil {
					return err
				}
				continue
			case fi.IsDir():
				h, err := header(name, fi, "", shift)
				if err != nil {
					return err
				}
				if stripSetID {
					h.Mode &^= 0o6000
				}
				if err := tw.WriteHeader(h); err != nil {
					return err
				}
				if opaque(full) {
					wh := &tar.Header{Name: path.Join(name, ".wh..wh..opq"), Typeflag: tar.TypeReg, Mode: 0o644, ModTime: epoch, Format: tar.FormatPAX}
					if err := tw.WriteHeader(wh); err != nil {
						return err
					}
				}
				if err := walk(full, name); err != nil {
					return err
				}
				continue
			case fi.Mode()&fs.ModeSymlink != 0:
				target, err := os.Readlink(full)
				if err != nil {
					return err
				}
				h, err := header(name, fi, target, shift)
				if err != nil {
					return err
				}
				if err := tw.WriteHeader(h); err != nil {
					return err
				}
				continue
			case fi.Mode().IsRegular():
				h, err := header(name, fi, "", shift)
				if err != nil {
					return err
				}
				if stripSetID {
					h.Mode &^= 0o6000
				}
				if budget -= h.Size; budget < 0 {
					return fmt.Errorf("/%s: %d bytes: the files' contents pass the size of the disk they are on (%d bytes; a sparse file or hard links count whole): %w",
						name, h.Size, int64(sfs.Blocks)*sfs.Bsize, errdefs.ErrResourceExhausted)
				}
				if err := tw.WriteHeader(h); err != nil {
					return err
				}
				// The build's processes are gone (its PID 1 has exited) or
				// the snapshotted sandbox is frozen, so the tree does not
				// change; still, never follow a link.
				f, err := os.OpenFile(full, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
				if err != nil {
					return err
				}
				_, err = io.Copy(tw, io.LimitReader(f, h.Size))
				f.Close()
				if err != nil {
					return err
				}
			default:
				// Sockets, fifos and device nodes are not carried in layers.
			}
		}
		return nil
	}
	if err := walk(upper, ""); err != nil {
		return err
	}
	return tw.Close()
}

func opaque(dir string) bool {
	buf := make([]byte, 4)
	for _, attr := range []string{"trusted.overlay.opaque", "user.overlay.opaque"} {
		if n, err := unix.Lgetxattr(dir, attr, buf); err == nil && n == 1 && buf[0] == 'y' {
			return true
		}
	}
	return false
}

// layerFromBytes is an uncompressed layer over tar bytes.
func layerFromBytes(b []byte) (v1.Layer, error) {
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
}

// parents returns the tar entries for the directories leading to dst.
func parents(tw *tar.Writer, dst string) error {
	dir := path.Dir(strings.TrimPrefix(dst, "/"))
	if dir == "." {
		return nil
	}
	parts := strings.Split(dir, "/")
	for i := range parts {
		h := &tar.Header{Name: strings.Join(parts[:i+1], "/") + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
	}
	return nil
}

// copyLayer makes the layer of a copy step from uploaded content: a file's
// bytes placed at dst, or a directory tar placed under dst.
func copyLayer(content io.Reader, dst string, isDir bool, mode uint32) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dst = path.Clean("/" + dst)
	if err := parents(tw, dst); err != nil {
		return nil, err
	}
	rel := strings.TrimPrefix(dst, "/")
	if !isDir {
		data, err := io.ReadAll(content)
		if err != nil {
			return nil, err
		}
		h := &tar.Header{Name: rel, Typeflag: tar.TypeReg, Mode: int64(mode), Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
		return buf.Bytes(), tw.Close()
	}
	if rel != "" {
		if err := tw.WriteHeader(&tar.Header{Name: rel + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	cr := &archiveReader{r: content}
	tr := tar.NewReader(cr)
	var entries []*tar.Header
	data := map[string][]byte{}
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("directory content: %w", err)
		}
		name := path.Clean(h.Name)
		if strings.HasPrefix(name, "../") || name == ".." || path.IsAbs(name) {
			return nil, fmt.Errorf("directory content: entry %q escapes the directory", h.Name)
		}
		if name == "." {
			continue
		}
		switch h.Typeflag {
		case tar.TypeDir:
			entries = append(entries, &tar.Header{Name: path.Join(rel, name) + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX})
		case tar.TypeReg:
			b, err := cr.entry(tr, h.Name)
			if err != nil {
				return nil, err
			}
			m := int64(0o644)
			if h.Mode&0o111 != 0 {
				m = 0o755
			}
			n := path.Join(rel, name)
			data[n] = b
			entries = append(entries, &tar.Header{Name: n, Typeflag: tar.TypeReg, Mode: m, Size: int64(len(b)), ModTime: epoch, Format: tar.FormatPAX})
		case tar.TypeSymlink:
			entries = append(entries, &tar.Header{Name: path.Join(rel, name), Typeflag: tar.TypeSymlink, Linkname: h.Linkname, Mode: 0o777, ModTime: epoch, Format: tar.FormatPAX})
		}
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name < entries[j].Name })
	for _, h := range entries {
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if b, ok := data[h.Name]; ok {
			if _, err := tw.Write(b); err != nil {
				return nil, err
			}
		}
	}
	return buf.Bytes(), tw.Close()
}

// archiveReader reads an API user's archive (an upload) and its entries'
// contents, which together can be no larger than the archive itself: a
// sparse entry reads as its holes too (archive/tar expands GNU and PAX
// sparse files), and a 1.5 KB upload could read as 100 GiB into chalkd's
// memory.
type archiveReader struct {
	r        io.Reader
	raw, got int64 // bytes of the archive read; bytes of its entries read
}

func (a *archiveReader) Read(p []byte) (int, error) {
	n, err := a.r.Read(p)
	a.raw += int64(n)
	return n, err
}

// entry reads the current entry of tr (which reads a), refusing it once
// the entries read pass the archive's bytes.
func (a *archiveReader) entry(tr *tar.Reader, name string) ([]byte, error) {
	var b bytes.Buffer
	chunk := make([]byte, 32<<10)
	for {
		n, err := tr.Read(chunk)
		b.Write(chunk[:n])
		if a.got += int64(n); a.got > a.raw {
			return nil, fmt.Errorf("entry %q: its content reads as more than the archive holds (%d bytes so far; a sparse entry?): %w", name, a.raw, errdefs.ErrResourceExhausted)
		}
		if errors.Is(err, io.EOF) {
			return b.Bytes(), nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// contextLayer makes the layer of a Dockerfile COPY/ADD from the build
// context tar: each source (a file or a directory, relative to the context)
// goes to dst with docker's rules (a directory's contents are copied; a file
// goes to dst, or into dst when dst ends in "/").
func contextLayer(content io.Reader, sources []string, dst string) ([]byte, error) {
	type entry struct {
		h    *tar.Header
		data []byte
	}
	var all []entry
	cr := &archiveReader{r: content}
	tr := tar.NewReader(cr)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("build context: %w", err)
		}
		b, err := cr.entry(tr, h.Name)
		if err != nil {
			return nil, err
		}
		switch h.Typeflag {
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			// The layer is extracted on the host (nodecache): no device
			// nodes or fifos from an API user's upload.
			return nil, fmt.Errorf("build context: entry %q: device nodes and fifos are refused: %w", h.Name, errdefs.ErrInvalidArgument)
		}
		hc := *h
		hc.Name = path.Clean(h.Name)
		if hc.Name == ".." || strings.HasPrefix(hc.Name, "../") || path.IsAbs(hc.Name) {
			return nil, fmt.Errorf("build context: entry %q escapes the context: %w", h.Name, errdefs.ErrInvalidArgument)
		}
		all = append(all, entry{&hc, b})
	}
	intoDir := strings.HasSuffix(dst, "/")
	dstClean := strings.TrimPrefix(path.Clean(dst), "/")
	var out []entry
	for _, src := range sources {
		src = path.Clean(src)
		if src == ".." || strings.HasPrefix(src, "../") {
			return nil, fmt.Errorf("COPY source %q: outside the build context: %w", src, errdefs.ErrInvalidArgument)
		}
		found := false
		for _, e := range all {
			var rel string
			switch {
			case src == "." || strings.HasPrefix(e.h.Name, src+"/"):
				rel = strings.TrimPrefix(e.h.Name, src+"/")
				if src == "." {
					rel = e.h.Name
				}
			case e.h.Name == src && e.h.Typeflag != tar.TypeDir:
				rel = path.Base(src)
				if !intoDir {
					rel = ""
				}
			case e.h.Name == src:
				found = true
				continue
			default:
				continue
			}
			found = true
			name := path.Join(dstClean, rel)
			h := &tar.Header{Name: name, Typeflag: e.h.Typeflag, Linkname: e.h.Linkname, Mode: e.h.Mode, Size: int64(len(e.data)), ModTime: epoch, Format: tar.FormatPAX}
			if h.Typeflag == tar.TypeDir {
				h.Name += "/"
				h.Size = 0
			}
			out = append(out, entry{h, e.data})
		}
		if !found {
			return nil, fmt.Errorf("COPY source %q: not in the build context", src)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].h.Name < out[j].h.Name })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	target := "/" + dstClean
	if intoDir {
		target += "/"
	}
	if err := parents(tw, target+"x"); err != nil && dstClean != "" {
		return nil, err
	}
	seen := map[string]bool{}
	for _, e := range out {
		if seen[e.h.Name] {
			continue
		}
		seen[e.h.Name] = true
		if err := tw.WriteHeader(e.h); err != nil {
			return nil, err
		}
		if e.h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(e.data); err != nil {
				return nil, err
			}
		}
	}
	return buf.Bytes(), tw.Close()
}
