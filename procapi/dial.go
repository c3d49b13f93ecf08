package procapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Dialer opens one connection to a sandbox's init. A Client calls it for
// every operation.
type Dialer func(ctx context.Context) (net.Conn, error)

// ErrUntrustedPeer marks a refused init socket: not a socket (a symlink a
// sandbox planted, say), or a listener that is not the sandbox's init. It is
// wrapped together with errdefs.ErrUnavailable.
var ErrUntrustedPeer = errors.New("untrusted sandbox init socket")

// PeerCheck decides whether the process that listens on an init socket (its
// credentials as SO_PEERCRED reports them, in the caller's pid and user
// namespaces) is the init it is meant to be. A nil error accepts it.
type PeerCheck func(cred *unix.Ucred) error

// DialSocket connects to the unix socket name in the directory dir without
// trusting anything a sandbox can write. dir is a host path the sandbox
// cannot change (its last component is not followed if it is a symlink);
// name, inside it, is opened with O_PATH|O_NOFOLLOW and must be a socket, so
// a symlink or a file renamed over it is refused rather than followed; the
// connection goes to exactly that inode (through /proc/self/fd, so a rename
// after the check changes nothing). Once connected, check gets the
// credentials of the socket's listener, before a byte is read or written.
//
// A missing socket or one nobody accepts on is errdefs.ErrUnavailable (init
// not serving yet); a refused one is ErrUntrustedPeer and
// errdefs.ErrUnavailable.
func DialSocket(ctx context.Context, dir, name string, check PeerCheck) (net.Conn, error) {
	if check == nil {
		return nil, fmt.Errorf("dial %s/%s: a peer check is required: %w", dir, name, errdefs.ErrInvalidArgument)
	}
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, notServing(dir, name, err)
	}
	fd, err := unix.Openat(dfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	unix.Close(dfd)
	if err != nil {
		return nil, notServing(dir, name, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, notServing(dir, name, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("sandbox init socket %s: not a socket (mode %#o): %w (%w)", name, st.Mode, ErrUntrustedPeer, errdefs.ErrUnavailable)
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", "/proc/self/fd/"+strconv.Itoa(fd))
	if err != nil {
		return nil, notServing(dir, name, err)
	}
	cred, err := peerCred(nc)
	if err == nil {
		err = check(cred)
	}
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("sandbox init socket %s: %v: %w (%w)", name, err, ErrUntrustedPeer, errdefs.ErrUnavailable)
	}
	return nc, nil
}

// notServing classifies an error of opening or connecting to init's socket.
func notServing(dir, name string, err error) error {
	var op *net.OpError
	if errors.As(err, &op) {
		err = op.Err // without the /proc/self/fd path
	}
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EAGAIN) {
		return fmt.Errorf("sandbox init socket %s: not serving: %w", name, errdefs.ErrUnavailable)
	}
	return fmt.Errorf("dial sandbox init socket %s: %v: %w", name, err, errdefs.ErrUnavailable)
}

// peerCred returns the credentials of the peer of a unix connection: for
// the connecting side, those of the process that called listen(2).
func peerCred(nc net.Conn) (*unix.Ucred, error) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return nil, fmt.Errorf("not a unix connection")
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	if cerr != nil {
		return nil, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return cred, nil
}
