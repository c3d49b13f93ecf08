package noderpc

import (
	"context"
	"path/filepath"
	"strings"

	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/sandbox"
)

// Identity keeps the identity files of a node's sandboxes (the daemon on
// the node: token files refreshed with tokens from FleetService.Workload,
// so no signing key and no credential is on the node).
type Identity interface {
	// Prepare writes sandbox id's files (the first tokens included) and
	// returns the bind of their dir.
	Prepare(ctx context.Context, id string, slot int, files []node.IdentityFile) (sandbox.Bind, error)
	// Remove stops refreshing an ended sandbox's tokens and removes its files.
	Remove(id string)
	// Restore resumes the refresh of the live sandboxes' tokens (a node
	// process restarted) and removes the files of the others.
	Restore(ctx context.Context, live map[string]int)
}

// WithIdentity makes the server keep identity files with i: Start writes
// them, Teardown, Destroy and Restore remove those of ended sandboxes.
func (s *Server) WithIdentity(i Identity) *Server {
	s.identity = i
	return s
}

// Bounds of a sandbox's identity files.
const (
	MaxIdentityFiles    = 16
	MaxIdentityFileSize = 64 << 10
	maxAudience         = 1024
)

// checkIdentityFiles refuses what would escape the identity dir or not fit.
func checkIdentityFiles(files []node.IdentityFile) error {
	if len(files) > MaxIdentityFiles {
		return invalid("identity files: %d (at most %d)", len(files), MaxIdentityFiles)
	}
	seen := map[string]bool{}
	for _, f := range files {
		if f.Name == "" || len(f.Name) > 64 || f.Name != filepath.Base(f.Name) || strings.HasPrefix(f.Name, ".") || seen[f.Name] {
			return invalid("identity file name %q: want a unique plain file name (at most 64 bytes, not hidden)", f.Name)
		}
		seen[f.Name] = true
		if len(f.Audience) > maxAudience || strings.ContainsAny(f.Audience, " \t\r\n") {
			return invalid("identity file %q: audience of %d bytes (at most %d, no spaces)", f.Name, len(f.Audience), maxAudience)
		}
		if f.Audience != "" && len(f.Content) > 0 {
			return invalid("identity file %q: a token file (audience) has no content", f.Name)
		}
		if len(f.Content) > MaxIdentityFileSize {
			return invalid("identity file %q: %d bytes (at most %d)", f.Name, len(f.Content), MaxIdentityFileSize)
		}
	}
	return nil
}
