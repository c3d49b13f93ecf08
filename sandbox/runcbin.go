package sandbox

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// runcSeals are the seals runc (libcontainer's nsenter, cloned_binary.c)
// requires of its own executable to take it as already cloned: exactly
// these, or it makes its own copy.
const runcSeals = unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE

// sealedBinaries are the sealed copies made by this process, by host path:
// one per binary however many Runtimes (the tests make many).
var sealedBinaries struct {
	sync.Mutex
	m map[string]*os.File
}

// sealedCopy returns the path (/proc/<this pid>/fd/<n>) of a sealed memfd
// holding a copy of the binary at path, made once per process.
//
// Why: every `runc run` protects the host's runc binary from the container
// (CVE-2019-5736: a container's root rewriting /proc/self/exe of runc init)
// by running `runc init` from a copy no one can write. runc 1.1 makes it on
// every start: a temporary file in its state dir, runc's binary bind-mounted
// read-only on it, opened, unmounted, removed, and `runc init` re-executed
// from that fd (a second dynamic load of runc and libseccomp). Started from
// a memfd with exactly runcSeals, runc takes its executable as that copy
// already (is_self_cloned: the F_GET_SEALS check, which needs no
// environment variable) and does none of it: ~1.7 ms of CPU per start on
// the CI VM (issue #18 round 8), and no inode made and deleted on the
// state dir's file system. The protection is the one runc falls back to
// itself: the copy cannot be written, shrunk or grown, and its seals
// cannot be changed. chalkd keeps the memfd (close-on-exec, so no child
// holds it); a runc upgraded on the host is used from chalkd's next start.
func sealedCopy(path string) (string, error) {
	sealedBinaries.Lock()
	defer sealedBinaries.Unlock()
	f := sealedBinaries.m[path]
	if f == nil {
		var err error
		if f, err = makeSealedCopy(path); err != nil {
			return "", err
		}
		if sealedBinaries.m == nil {
			sealedBinaries.m = map[string]*os.File{}
		}
		sealedBinaries.m[path] = f
	}
	// The pid's fd table, not /proc/self: a child resolves the path before
	// its exec, when its own fd of that number may already be one of the
	// ExtraFiles os/exec moved there.
	return "/proc/" + strconv.Itoa(os.Getpid()) + "/fd/" + strconv.Itoa(int(f.Fd())), nil
}

func makeSealedCopy(path string) (*os.File, error) {
	src, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	fd, err := unix.MemfdCreate("runc", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("sealed copy of %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path+" (sealed copy)")
	if _, err := io.Copy(f, src); err != nil {
		f.Close()
		return nil, fmt.Errorf("sealed copy of %s: %w", path, err)
	}
	if err := unix.Fchmod(fd, 0o500); err != nil {
		f.Close()
		return nil, fmt.Errorf("sealed copy of %s: %w", path, err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, runcSeals); err != nil {
		f.Close()
		return nil, fmt.Errorf("seal the copy of %s: %w", path, err)
	}
	return f, nil
}
