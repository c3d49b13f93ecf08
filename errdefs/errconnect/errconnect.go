// Package errconnect converts between errdefs classes and Connect (gRPC)
// codes, both ways, in one table: chalkd's API converts handler errors to
// wire codes with ToConnect, and the Go SDK turns wire codes back into
// errdefs classes with Class, so errors.Is(err, errdefs.ErrNotFound) holds on
// both sides of the wire (after containerd's errdefs/pkg/errgrpc).
package errconnect

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// table is the one mapping; the first entry for a code is its class on the
// way back.
var table = []struct {
	class error
	code  connect.Code
}{
	{errdefs.ErrNotFound, connect.CodeNotFound},
	{errdefs.ErrAlreadyExists, connect.CodeAlreadyExists},
	{errdefs.ErrInvalidArgument, connect.CodeInvalidArgument},
	{errdefs.ErrFailedPrecondition, connect.CodeFailedPrecondition},
	{errdefs.ErrUnauthenticated, connect.CodeUnauthenticated},
	{errdefs.ErrPermissionDenied, connect.CodePermissionDenied},
	{errdefs.ErrResourceExhausted, connect.CodeResourceExhausted},
	{errdefs.ErrDeadlineExceeded, connect.CodeDeadlineExceeded},
	{errdefs.ErrUnavailable, connect.CodeUnavailable},
	{context.DeadlineExceeded, connect.CodeDeadlineExceeded},
	{context.Canceled, connect.CodeCanceled},
}

// ToConnect converts err to a Connect error with the code of its errdefs
// class (a *connect.Error passes through unchanged). Errors of no class are
// internal.
func ToConnect(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	for _, c := range table {
		if errors.Is(err, c.class) {
			return connect.NewError(c.code, err)
		}
	}
	return connect.NewError(connect.CodeInternal, err)
}

// Class returns the errdefs class of a wire code (context.Canceled for
// canceled), or nil when the code has none (internal, unknown...).
func Class(code connect.Code) error {
	for _, c := range table {
		if c.code == code {
			return c.class
		}
	}
	return nil
}
