package daemon

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// pruneLogs removes the console logs (LOG and LOG.1) in logDir of sandboxes
// that ended more than retention before now: those whose state dir under
// stateDir is gone (a live or pre-started sandbox has one, whatever the age
// of its log) and whose log was last written before now-retention. It
// returns the names removed.
func pruneLogs(logDir, stateDir string, retention time.Duration, now time.Time) ([]string, error) {
	ents, err := os.ReadDir(logDir)
	if err != nil {
		return nil, err
	}
	var removed []string
	for _, e := range ents {
		id, ok := strings.CutSuffix(strings.TrimSuffix(e.Name(), ".1"), ".log")
		if !ok || id == "" || !e.Type().IsRegular() {
			continue
		}
		if _, err := os.Lstat(filepath.Join(stateDir, id)); err == nil {
			continue // still on this node
		}
		fi, err := e.Info()
		if err != nil || !fi.ModTime().Before(now.Add(-retention)) {
			continue
		}
		if err := os.Remove(filepath.Join(logDir, e.Name())); err == nil {
			removed = append(removed, e.Name())
		}
	}
	return removed, nil
}

// logPruneEvery is how often chalkd looks for expired console logs.
const logPruneEvery = time.Hour

// pruneLogsLoop prunes at start and then every logPruneEvery until ctx ends.
func pruneLogsLoop(ctx context.Context, log *slog.Logger, dataDir string, retention time.Duration) {
	t := time.NewTicker(logPruneEvery)
	defer t.Stop()
	for {
		removed, err := pruneLogs(filepath.Join(dataDir, "logs"), filepath.Join(dataDir, "sandboxes"), retention, time.Now())
		if err != nil {
			log.Warn("prune console logs", "err", err)
		} else if len(removed) > 0 {
			log.Info("pruned console logs of ended sandboxes", "files", len(removed), "retention", retention)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
