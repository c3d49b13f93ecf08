package main

import (
	"flag"
	"io"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/daemon"
)

// TestAuditRetentionFlag: --audit-retention (all-in-one and control plane)
// defaults to daemon.DefaultAuditRetention (90 days) and takes 0 or a
// negative duration for "kept for ever", which the daemon's config gets
// as is.
func TestAuditRetentionFlag(t *testing.T) {
	if daemon.DefaultAuditRetention != 90*24*time.Hour {
		t.Fatalf("default %v, the documented one is 90 days (2160h)", daemon.DefaultAuditRetention)
	}
	for _, mode := range []string{"", "control"} {
		for _, tc := range []struct {
			args []string
			want time.Duration
		}{
			{nil, daemon.DefaultAuditRetention},
			{[]string{"--audit-retention", "720h"}, 720 * time.Hour},
			{[]string{"--audit-retention", "0"}, 0},
			{[]string{"--audit-retention=-1s"}, -time.Second},
		} {
			f := newFlags(mode, flag.ContinueOnError)
			f.fs.SetOutput(io.Discard)
			if err := f.fs.Parse(tc.args); err != nil || f.cfg.AuditRetention != tc.want {
				t.Errorf("chalkd %s %q: retention %v, %v; want %v", mode, tc.args, f.cfg.AuditRetention, err, tc.want)
			}
		}
	}
}
