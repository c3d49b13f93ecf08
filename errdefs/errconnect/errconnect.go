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

// FromConnect turns an error from a Connect client back into an error of its
// errdefs class (errors.Is holds; the message is the server's). Errors that
// are not *connect.Error, or whose code has no class, are returned unchanged.
func FromConnect(err error) error {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return err
	}
	class := Class(ce.Code())
	if class == nil {
		return err
	}
	return &classed{msg: ce.Message(), class: class, err: err}
}

// classed is a wire error with its errdefs class.
type classed struct {
	msg   string
	class error
	err   error
}

func (c *classed) Error() string   { return c.msg }
func (c *classed) Unwrap() []error { return []error{c.class, c.err} }
