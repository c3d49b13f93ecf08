// Package atomicfile replaces files atomically: a reader sees the old
// content or the new, never a partial file, and concurrent writers of one
// path do not share a temporary file.
package atomicfile

import (
	"os"
	"path/filepath"
)

// WriteFile replaces path with data, mode perm: it writes a temporary file
// in path's directory, syncs it and renames it over path, then syncs the
// directory (best effort) so that the rename survives a crash. On error
// path is unchanged and no temporary file is left.
func WriteFile(path string, data []byte, perm os.FileMode) (err error) {
	return write(path, data, perm, true)
}

// WriteFileNoSync is WriteFile without the syncs: still atomic for readers,
// but after a crash path may hold the old content (or none). Only for files
// that are made again after a restart (a sandbox's identity tokens are
// minted again when chalkd resumes it); it saves two fsyncs on a sandbox's
// start path.
func WriteFileNoSync(path string, data []byte, perm os.FileMode) error {
	return write(path, data, perm, false)
}

func write(path string, data []byte, perm os.FileMode, sync bool) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			os.Remove(tmp)
		}
	}()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm) // CreateTemp makes 0600; the umask does not apply to Chmod
	}
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	if !sync {
		return nil
	}
	if d, derr := os.Open(filepath.Dir(path)); derr == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
