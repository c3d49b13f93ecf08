package chalkcompute

import (
	"fmt"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// The API's bounds on what a client sends (the server's api.MaxStringBytes,
// MaxEntrypointArgs, MaxEnvVars, MaxArgBytes, MaxArgsTotalBytes and
// MaxImageSpecBytes; a test of package api checks they agree). The SDK checks them before sending, so
// an oversized command, path or name fails at once, naming the field, with
// the same class (invalid argument) as the server's refusal.
const (
	MaxStringBytes    = 4096      // an image reference, workdir, user, file path, name
	MaxArgs           = 4096      // entrypoint or argv elements; env variables
	MaxArgBytes       = 128 << 10 // one element, one NAME=value
	MaxArgsTotalBytes = 1 << 20   // a command line's and its env's bytes together
	MaxImageSpecBytes = 1 << 20   // an image spec's JSON (steps, Dockerfile text; files go by digest)
)

func invalidArg(format string, a ...any) error {
	return fmt.Errorf(format+": %w", append(a, errdefs.ErrInvalidArgument)...)
}

// checkStrings checks strings against MaxStringBytes, in pairs of field
// name and value.
func checkStrings(pairs ...string) error {
	for i := 0; i+1 < len(pairs); i += 2 {
		if n := len(pairs[i+1]); n > MaxStringBytes {
			return invalidArg("%s: %d bytes (at most %d)", pairs[i], n, MaxStringBytes)
		}
	}
	return nil
}

// checkCommand checks a command line (field: "entrypoint" or "argv") and
// its env against the API's bounds.
func checkCommand(field string, args []string, env map[string]string) error {
	if len(args) > MaxArgs {
		return invalidArg("%s: %d elements (at most %d)", field, len(args), MaxArgs)
	}
	if len(env) > MaxArgs {
		return invalidArg("env: %d variables (at most %d)", len(env), MaxArgs)
	}
	total := 0
	for i, a := range args {
		if len(a) > MaxArgBytes {
			return invalidArg("%s[%d]: %d bytes (at most %d)", field, i, len(a), MaxArgBytes)
		}
		total += len(a)
	}
	for k, v := range env {
		n := len(k) + 1 + len(v)
		if n > MaxArgBytes {
			return invalidArg("env %.64s: %d bytes as NAME=value (at most %d)", k, n, MaxArgBytes)
		}
		total += n
	}
	if total > MaxArgsTotalBytes {
		return invalidArg("%s and env: %d bytes together (at most %d)", field, total, MaxArgsTotalBytes)
	}
	return nil
}

// checkSpec checks an image spec's JSON (field: "image_spec_json" or
// "spec_json", as the API names it) against MaxImageSpecBytes.
func checkSpec(field string, spec []byte) error {
	if n := len(spec); n > MaxImageSpecBytes {
		return invalidArg("%s: %d bytes (at most %d): the image spec is too large", field, n, MaxImageSpecBytes)
	}
	return nil
}
