package daemon

import (
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// TeardownHoldEnv, for tests only, names a directory where every background
// sandbox teardown stops in its middle (container removed, network not
// yet): it writes <dir>/<id>.held and waits until <dir>/<id>.go exists.
// End-to-end tests kill chalkd there to see that the next start finishes
// the teardown and that the slot is not reused before.
const TeardownHoldEnv = "CHALK_TEST_HOLD_TEARDOWN"

// teardownHold returns the node agent's TeardownHold for TeardownHoldEnv
// (nil when it is not set).
func teardownHold(log *slog.Logger) func(id string) {
	dir := os.Getenv(TeardownHoldEnv)
	if dir == "" {
		return nil
	}
	log.Warn("test hook: sandbox teardowns stop halfway until released", "env", TeardownHoldEnv, "dir", dir)
	return func(id string) {
		if id == "" || filepath.Base(id) != id {
			return
		}
		_ = os.WriteFile(filepath.Join(dir, id+".held"), nil, 0o600)
		for {
			if _, err := os.Stat(filepath.Join(dir, id+".go")); err == nil {
				return
			}
			time.Sleep(10 * time.Millisecond) // the test, another process, releases it
		}
	}
}
