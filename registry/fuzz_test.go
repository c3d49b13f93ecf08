package registry

import (
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
)

// FuzzLocalRef checks that any reference LocalRef accepts maps into the
// embedded registry, parses again, and maps to itself.
func FuzzLocalRef(f *testing.F) {
	for _, s := range []string{
		"busybox", "python:3.11-slim-bookworm", "ghcr.io/org/x:tag", "nvcr.io/nvidia/pytorch:24.01-py3",
		"localhost:5000/a/b:c", "x@sha256:" + strings.Repeat("a", 64), "a:b@sha256:" + strings.Repeat("1", 64),
		"", ":", "@", "UPPER", "a//b", "docker.io/library/../x",
	} {
		f.Add(s)
	}
	r := &Registry{addr: "127.0.0.1:5000"}
	var err error
	if r.host, err = name.NewRegistry(r.addr, name.Insecure); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, ref string) {
		local, err := r.LocalRef(ref)
		if err != nil {
			return
		}
		s := local.String()
		if !strings.HasPrefix(s, r.addr+"/") {
			t.Fatalf("LocalRef(%q) = %q, not in the embedded registry", ref, s)
		}
		again, err := r.LocalRef(s)
		if err != nil {
			t.Fatalf("LocalRef(%q) = %q does not parse again: %v", ref, s, err)
		}
		if again.String() != s {
			t.Fatalf("LocalRef not idempotent: %q -> %q -> %q", ref, s, again)
		}
	})
}
