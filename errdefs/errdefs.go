// Package errdefs defines the few error classes chalkcompute uses everywhere.
//
// Code wraps one of these with the identifiers a reader needs, for example
// fmt.Errorf("sandbox %q: %w", id, errdefs.ErrNotFound). Exactly one place
// (package errdefs/errconnect) maps them to wire codes and back.
package errdefs

import "errors"

var (
	// ErrNotFound means the named object does not exist.
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists means an object with that name or key already exists.
	ErrAlreadyExists = errors.New("already exists")
	// ErrInvalidArgument means the request is malformed or a value is out of range.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrFailedPrecondition means the object is in the wrong state for the call
	// (for example exec in a sandbox that has stopped).
	ErrFailedPrecondition = errors.New("failed precondition")
	// ErrUnauthenticated means the caller presented no valid credential.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrPermissionDenied means the caller is known but may not do this.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrResourceExhausted means a limit was hit (size, rate, capacity).
	ErrResourceExhausted = errors.New("resource exhausted")
	// ErrDeadlineExceeded means the operation ran out of time.
	ErrDeadlineExceeded = errors.New("deadline exceeded")
	// ErrUnavailable means a dependency is temporarily unavailable.
	ErrUnavailable = errors.New("unavailable")
)

// Is reports whether err is of class target; it is errors.Is, re-exported for
// readability at call sites.
func Is(err, target error) bool { return errors.Is(err, target) }
