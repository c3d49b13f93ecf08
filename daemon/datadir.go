package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// dataDirModes are the modes of DataDir's subdirectories, set at every start
// (so an install made by an older chalkd, with 0755 directories, is fixed).
// Uploads, layers, logs, the registry and tokens are private to chalkd: a
// local user must not read another user's content. Only the sandboxes' state
// dir is searchable (0711, not listable): a sandbox's root, an unprivileged
// host uid in a user namespace, must reach its own rootfs there (runc
// pivots into it after joining the namespace; each sandbox's own dir is
// 0710 to its range). Bind-mount sources (mount uploads, identity files) are
// opened by runc on the host side, so they can stay 0700. bin/ (chalk-init
// and chalk) is 0755 by stageBinaries.
var dataDirModes = map[string]os.FileMode{
	"blobs":          0o700,
	"mounts":         0o700,
	"cache":          0o700,
	"logs":           0o700,
	"registry":       0o700,
	"identity":       0o700,
	"identity-files": 0o700,
	"prestarted":     0o700,
	"teardown":       0o700,
	"sandboxes":      0o711,
}

// restrictDataDir makes (or fixes) DataDir's subdirectories with
// dataDirModes, and DataDir itself 0700 when no sandbox runs in a user
// namespace (Start makes it 0711 otherwise).
func restrictDataDir(dataDir string, userns bool) error {
	if !userns {
		if err := os.Chmod(dataDir, 0o700); err != nil {
			return fmt.Errorf("data dir: %w", err)
		}
	}
	for name, mode := range dataDirModes {
		p := filepath.Join(dataDir, name)
		if err := os.Mkdir(p, mode); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("data dir: %w", err)
		}
		if err := os.Chmod(p, mode); err != nil {
			return fmt.Errorf("data dir: %w", err)
		}
	}
	return nil
}
