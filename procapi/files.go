package procapi

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// FileInfo describes a file in the sandbox. For ListDir entries it describes
// the entry itself (a symlink has fs.ModeSymlink); Stat follows symlinks.
type FileInfo struct {
	Name    string      `json:"name"`
	Size    int64       `json:"size"`
	Mode    fs.FileMode `json:"mode"`
	ModTime time.Time   `json:"mod_time"`
	IsDir   bool        `json:"is_dir"`
}

// listBatch is how many entries go in one list frame (well below MaxFrame
// even with 255-byte names).
const listBatch = 256

const (
	// MaxListEntries is the most entries ListDir returns: a larger
	// directory is errdefs.ErrResourceExhausted (list it with an exec:
	// `ls`, `find`), so that a listing costs the host a bounded amount of
	// memory (MaxListEntries entries of at most MaxNameLen bytes of name).
	MaxListEntries = 20000
	// MaxNameLen is the longest file name in a listing (NAME_MAX).
	MaxNameLen = 255
)

// errTooManyEntries is the error of a listing over MaxListEntries.
func errTooManyEntries(path string) error {
	return fmt.Errorf("list %s: more than %d entries (procapi.MaxListEntries); list it with an exec (ls, find) instead: %w", path, MaxListEntries, errdefs.ErrResourceExhausted)
}

// fileErr classifies a file system error.
func fileErr(op, path string, err error) error {
	var class error
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s %s: no such file or directory: %w", op, path, errdefs.ErrNotFound)
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EROFS):
		class = errdefs.ErrPermissionDenied
	case errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ENOTDIR), errors.Is(err, syscall.ENOTEMPTY),
		errors.Is(err, syscall.EEXIST), errors.Is(err, syscall.EBUSY):
		class = errdefs.ErrFailedPrecondition
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		class = errdefs.ErrResourceExhausted
	case errors.Is(err, syscall.ENAMETOOLONG), errors.Is(err, syscall.EINVAL):
		class = errdefs.ErrInvalidArgument
	default:
		return fmt.Errorf("%s %s: %w", op, path, err)
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return fmt.Errorf("%s %s: %v: %w", op, path, errno, class)
	}
	return fmt.Errorf("%s %s: %w", op, path, class)
}

// checkPath validates a path of a file operation.
func checkPath(p string) error {
	if p == "" || !filepath.IsAbs(p) {
		return fmt.Errorf("path %q: must be absolute: %w", p, errdefs.ErrInvalidArgument)
	}
	return nil
}

func (s *server) readFile(c *conn, req *request) {
	if err := checkPath(req.Path); err != nil {
		c.sendErr(err)
		return
	}
	f, err := os.Open(req.Path)
	if err != nil {
		c.sendErr(fileErr("read", req.Path, err))
		return
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.IsDir() {
		c.sendErr(fmt.Errorf("read %s: is a directory: %w", req.Path, errdefs.ErrFailedPrecondition))
		return
	}
	buf := make([]byte, MaxChunk)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			if c.send(frameFile, buf[:n]) != nil {
				return // the client is gone
			}
		}
		if err == io.EOF {
			_ = c.send(frameFileEnd, nil)
			return
		}
		if err != nil {
			c.sendErr(fileErr("read", req.Path, err))
			return
		}
	}
}

// mkdirAll creates dir and its missing parents, owned by owner (nil: as is).
func mkdirAll(dir string, owner *syscall.Credential) error {
	st, err := os.Stat(dir)
	if err == nil {
		if !st.IsDir() {
			return fmt.Errorf("mkdir %s: %w", dir, syscall.ENOTDIR)
		}
		return nil
	}
	if parent := filepath.Dir(dir); parent != dir {
		if err := mkdirAll(parent, owner); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil // raced with another writer
		}
		return err
	}
	if owner != nil {
		return os.Lchown(dir, int(owner.Uid), int(owner.Gid))
	}
	return nil
}

func (s *server) writeFile(c *conn, req *request) {
	if err := checkPath(req.Path); err != nil {
		c.sendErr(err)
		return
	}
	path := filepath.Clean(req.Path)
	if path == "/" {
		c.sendErr(fmt.Errorf("write /: %w", errdefs.ErrInvalidArgument))
		return
	}
	mode := fs.FileMode(req.Mode) & fs.ModePerm
	if mode == 0 {
		mode = 0o644
	}
	dir := filepath.Dir(path)
	if err := mkdirAll(dir, s.owner); err != nil {
		c.sendErr(fileErr("mkdir", dir, err))
		return
	}
	// A replaced file keeps its owner; a new one belongs to the default user.
	owner := s.owner
	if st, err := os.Stat(path); err == nil {
		if st.IsDir() {
			c.sendErr(fmt.Errorf("write %s: is a directory: %w", path, errdefs.ErrFailedPrecondition))
			return
		}
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			owner = &syscall.Credential{Uid: sys.Uid, Gid: sys.Gid}
		}
	}
	tmp, err := os.CreateTemp(dir, ".chalk-write-*")
	if err != nil {
		c.sendErr(fileErr("write", path, err))
		return
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	buf := make([]byte, MaxChunk)
	for {
		typ, b, err := readFrame(c, buf)
		if err != nil {
			return // the client is gone: discard the partial file
		}
		if typ == frameDataEnd {
			break
		}
		if typ != frameData {
			c.sendErr(fmt.Errorf("write %s: unexpected frame %q: %w", path, typ, errdefs.ErrInvalidArgument))
			return
		}
		if _, err := tmp.Write(b); err != nil {
			c.sendErr(fileErr("write", path, err))
			return
		}
	}
	if owner != nil && (int(owner.Uid) != os.Geteuid() || int(owner.Gid) != os.Getegid()) {
		if err := tmp.Chown(int(owner.Uid), int(owner.Gid)); err != nil {
			c.sendErr(fileErr("chown", path, err))
			return
		}
	}
	// After chown, which clears set-id bits.
	if err := tmp.Chmod(mode); err != nil {
		c.sendErr(fileErr("chmod", path, err))
		return
	}
	if err := tmp.Close(); err != nil {
		c.sendErr(fileErr("write", path, err))
		return
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		c.sendErr(fileErr("write", path, err))
		return
	}
	ok = true
	_ = c.sendJSON(frameResult, struct{}{})
}

func infoOf(name string, st fs.FileInfo) FileInfo {
	return FileInfo{Name: name, Size: st.Size(), Mode: st.Mode(), ModTime: st.ModTime(), IsDir: st.IsDir()}
}

func (s *server) stat(c *conn, req *request) {
	if err := checkPath(req.Path); err != nil {
		c.sendErr(err)
		return
	}
	st, err := os.Stat(req.Path)
	if err != nil {
		c.sendErr(fileErr("stat", req.Path, err))
		return
	}
	_ = c.sendJSON(frameResult, infoOf(filepath.Base(req.Path), st))
}

func (s *server) list(c *conn, req *request) {
	if err := checkPath(req.Path); err != nil {
		c.sendErr(err)
		return
	}
	d, err := os.Open(req.Path)
	if err != nil {
		c.sendErr(fileErr("list", req.Path, err))
		return
	}
	defer d.Close()
	batch := make([]FileInfo, 0, listBatch)
	total := 0
	for {
		ents, err := d.ReadDir(listBatch)
		for _, e := range ents {
			st, err := e.Info()
			if err != nil {
				continue // removed since it was listed
			}
			batch = append(batch, infoOf(e.Name(), st))
		}
		if total += len(batch); total > MaxListEntries {
			c.sendErr(errTooManyEntries(req.Path))
			return
		}
		if len(batch) > 0 {
			if c.sendJSON(frameList, batch) != nil {
				return
			}
			batch = batch[:0]
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			c.sendErr(fileErr("list", req.Path, err))
			return
		}
	}
	_ = c.sendJSON(frameResult, struct{}{})
}

func (s *server) remove(c *conn, req *request) {
	if err := checkPath(req.Path); err != nil {
		c.sendErr(err)
		return
	}
	if filepath.Clean(req.Path) == "/" {
		c.sendErr(fmt.Errorf("remove /: %w", errdefs.ErrInvalidArgument))
		return
	}
	if _, err := os.Lstat(req.Path); err != nil {
		c.sendErr(fileErr("remove", req.Path, err))
		return
	}
	var err error
	if req.Recursive {
		err = os.RemoveAll(req.Path)
	} else {
		err = os.Remove(req.Path)
	}
	if err != nil {
		c.sendErr(fileErr("remove", req.Path, err))
		return
	}
	_ = c.sendJSON(frameResult, struct{}{})
}
