package api

import (
	"errors"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// TestValidateCreateNUL: strings that go to the OS (argv, paths) are refused
// with invalid_argument naming the field when they hold a NUL byte.
func TestValidateCreateNUL(t *testing.T) {
	for _, tc := range []struct {
		req  *v1.CreateSandboxRequest
		want string
	}{
		{&v1.CreateSandboxRequest{Image: "busybox", Entrypoint: []string{"sleep", "1\x00"}}, "entrypoint[1]: contains a NUL byte"},
		{&v1.CreateSandboxRequest{Image: "busybox", Entrypoint: []string{"sh\x00"}}, "entrypoint[0]: contains a NUL byte"},
		{&v1.CreateSandboxRequest{Image: "busybox", Workdir: "/tmp\x00x"}, "workdir: contains a NUL byte"},
		{&v1.CreateSandboxRequest{Image: "busy\x00box"}, "image: contains a NUL byte"},
		{&v1.CreateSandboxRequest{Image: "busybox", Env: map[string]string{"A": "b\x00"}}, "value contains NUL"},
	} {
		_, _, err := validateCreate(tc.req)
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want invalid argument with %q", tc.req.String(), err, tc.want)
		}
	}
	if _, _, err := validateCreate(&v1.CreateSandboxRequest{Image: "busybox", Entrypoint: []string{"sleep", "1"}, Workdir: "/tmp"}); err != nil {
		t.Errorf("valid request: %v", err)
	}
}
