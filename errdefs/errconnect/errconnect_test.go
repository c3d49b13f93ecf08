package errconnect

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestRoundTrip: every errdefs class survives the wire (ToConnect, then
// Class of the code), wrapped or not.
func TestRoundTrip(t *testing.T) {
	classes := []error{
		errdefs.ErrNotFound, errdefs.ErrAlreadyExists, errdefs.ErrInvalidArgument, errdefs.ErrFailedPrecondition,
		errdefs.ErrUnauthenticated, errdefs.ErrPermissionDenied, errdefs.ErrResourceExhausted,
		errdefs.ErrDeadlineExceeded, errdefs.ErrUnavailable,
	}
	for _, class := range classes {
		t.Run(class.Error(), func(t *testing.T) {
			wrapped := fmt.Errorf("sandbox %q: %w", "sbx-1", class)
			var ce *connect.Error
			if !errors.As(ToConnect(wrapped), &ce) {
				t.Fatalf("ToConnect(%v) is not a connect error", wrapped)
			}
			if back := Class(ce.Code()); back != class {
				t.Fatalf("%v -> %v -> %v", class, ce.Code(), back)
			}
			if ce.Message() != wrapped.Error() {
				t.Fatalf("message %q, want %q", ce.Message(), wrapped.Error())
			}
		})
	}
}

func TestToConnect(t *testing.T) {
	if ToConnect(nil) != nil {
		t.Fatal("nil must stay nil")
	}
	for _, tt := range []struct {
		err  error
		code connect.Code
	}{
		{errors.New("boom"), connect.CodeInternal},
		{fmt.Errorf("wait: %w", context.DeadlineExceeded), connect.CodeDeadlineExceeded},
		{context.Canceled, connect.CodeCanceled},
		{connect.NewError(connect.CodeAborted, errors.New("x")), connect.CodeAborted}, // passes through
	} {
		if got := connect.CodeOf(ToConnect(tt.err)); got != tt.code {
			t.Errorf("ToConnect(%v) code %v, want %v", tt.err, got, tt.code)
		}
	}
	if Class(connect.CodeInternal) != nil || Class(connect.CodeUnknown) != nil {
		t.Fatal("internal/unknown have no class")
	}
}

// TestFromConnect: a client's wire error is of its errdefs class again, with
// the server's message; errors without a class pass unchanged.
func TestFromConnect(t *testing.T) {
	wire := ToConnect(fmt.Errorf("sandbox %q: %w", "sbx-1", errdefs.ErrNotFound))
	got := FromConnect(wire)
	if !errors.Is(got, errdefs.ErrNotFound) || got.Error() != `sandbox "sbx-1": not found` {
		t.Fatalf("FromConnect = %v (%T)", got, got)
	}
	var ce *connect.Error
	if !errors.As(got, &ce) {
		t.Error("the connect error is no longer reachable")
	}
	internal := connect.NewError(connect.CodeInternal, errors.New("boom"))
	if FromConnect(internal) != error(internal) {
		t.Error("an internal error was changed")
	}
	plain := errors.New("x")
	if FromConnect(plain) != plain || FromConnect(nil) != nil {
		t.Error("non-connect errors must pass unchanged")
	}
}
