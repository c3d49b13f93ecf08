package api

import (
	"fmt"

	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/chalkcompute/chalkcompute/internal/reqlimit"
)

// Bounds of every request's strings, lists and maps, checked once per call
// (requestBounds, from authorize) before a handler, a store lookup or the
// audit trail sees any of it. The API's message limit alone let one string
// be ~65 MiB: a sandbox id, an image reference, a workdir or a file path of
// that size was looked up, echoed in the error and stored in the audit
// record of the call. Fields with bounds of their own (the entrypoint's,
// argv's and env's MaxArgBytes, the policies' and peers' counts) are checked
// again with their own messages by their handlers.
const (
	// MaxStringBytes bounds a request string without a bound of its own:
	// names, ids, references, paths (PATH_MAX is 4,096), URLs, users.
	MaxStringBytes = 4096
	// MaxListLen bounds a repeated field or a map without a bound of its own.
	MaxListLen = 4096
	// MaxCredentialBytes bounds an MCP server's credential (a token).
	MaxCredentialBytes = 64 << 10
	// MaxImageSpecBytes bounds an image spec's JSON (a create's
	// image_spec_json, a build's spec_json). A spec holds its steps'
	// commands, package names and paths, and a Dockerfile's text; files
	// are uploaded apart and named by their digest (71 bytes each), so a
	// spec of thousands of steps and files is a few hundred KiB, and a
	// larger one was only parsed (strictly, whole) to be refused later.
	MaxImageSpecBytes = 1 << 20
)

// stringBounds are the fields whose strings have another bound than
// MaxStringBytes; 0 means only the API's message limit (an output field a
// client may send back, which is ignored).
var stringBounds = map[protoreflect.FullName]int{
	"chalk.compute.v1.CreateSandboxRequest.image_spec_json": MaxImageSpecBytes,
	"chalk.compute.v1.BuildImageRequest.spec_json":          MaxImageSpecBytes,
	"chalk.compute.v1.CreateSandboxRequest.entrypoint":      MaxArgBytes,
	"chalk.compute.v1.CreateSandboxRequest.env":             MaxArgBytes,
	"chalk.compute.v1.ExecRequest.argv":                     MaxArgBytes,
	"chalk.compute.v1.ExecRequest.env":                      MaxArgBytes,
	"chalk.compute.v1.McpServer.credential":                 MaxCredentialBytes,
	// Output only (a peer's wg-quick file, one section per member), and
	// ignored in an Apply: a client that applies what Get returned sends it.
	"chalk.compute.v1.TunnelPeer.config": 0,
}

// ownCount are the lists and maps whose length the handler checks with a
// bound and a message of its own (argBounds: MaxEntrypointArgs, MaxEnvVars).
var ownCount = map[protoreflect.FullName]bool{
	"chalk.compute.v1.CreateSandboxRequest.entrypoint": true,
	"chalk.compute.v1.CreateSandboxRequest.env":        true,
	"chalk.compute.v1.ExecRequest.argv":                true,
	"chalk.compute.v1.ExecRequest.env":                 true,
}

// requestBounds checks every string, list and map of a request (nested
// messages too) against the bounds above, naming the field.
func requestBounds(m protoreflect.Message) error {
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch fd.Kind() {
		case protoreflect.StringKind, protoreflect.MessageKind, protoreflect.GroupKind:
		default:
			if !fd.IsList() {
				return true // a number, a bool, bytes (bounded by the message limit and their handlers)
			}
		}
		err = fieldBounds(fd, v)
		return err == nil
	})
	return err
}

func fieldBounds(fd protoreflect.FieldDescriptor, v protoreflect.Value) error {
	max, ok := stringBounds[fd.FullName()]
	if !ok {
		max = MaxStringBytes
	}
	name := fd.Name()
	switch {
	case fd.IsList():
		l := v.List()
		if l.Len() > MaxListLen && !ownCount[fd.FullName()] {
			return invalid("%s: %d elements (at most %d, api.MaxListLen)", name, l.Len(), MaxListLen)
		}
		for i := range l.Len() {
			if err := valueBounds(fd, l.Get(i), max); err != nil {
				return fmt.Errorf("%s[%d]%w", name, i, err)
			}
		}
	case fd.IsMap():
		mp := v.Map()
		if mp.Len() > MaxListLen && !ownCount[fd.FullName()] {
			return invalid("%s: %d entries (at most %d, api.MaxListLen)", name, mp.Len(), MaxListLen)
		}
		var err error
		mp.Range(func(k protoreflect.MapKey, v protoreflect.Value) bool {
			key := k.String()
			if max > 0 && len(key) > max {
				err = invalid("%s key %s: %d bytes (at most %d)", name, short(key), len(key), max)
				return false
			}
			if verr := valueBounds(fd.MapValue(), v, max); verr != nil {
				err = fmt.Errorf("%s %s%w", name, short(key), verr)
			}
			return err == nil
		})
		return err
	default:
		if err := valueBounds(fd, v, max); err != nil {
			return fmt.Errorf("%s%w", name, err)
		}
	}
	return nil
}

// valueBounds checks one value; its error follows the field's name
// (": N bytes (at most M)"), made only when there is one.
func valueBounds(fd protoreflect.FieldDescriptor, v protoreflect.Value, max int) error {
	switch fd.Kind() {
	case protoreflect.StringKind:
		if n := len(v.String()); max > 0 && n > max {
			return invalid(": %d bytes (at most %d)", n, max)
		}
	case protoreflect.MessageKind, protoreflect.GroupKind:
		if err := requestBounds(v.Message()); err != nil {
			return fmt.Errorf(": %w", err)
		}
	}
	return nil
}

// short is s cut to 64 bytes (at a rune boundary) for an error message.
func short(s string) string {
	return reqlimit.Clip(s, 64)
}
