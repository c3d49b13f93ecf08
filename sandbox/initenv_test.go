package sandbox

import (
	"slices"
	"testing"
)

// TestInitEnv: init's environment gets GOMAXPROCS=1 (its runtime starts
// with one P) and init is told to drop it, unless the sandbox sets
// GOMAXPROCS itself, which is then left alone; the caller's slice is never
// written.
func TestInitEnv(t *testing.T) {
	base := make([]string, 1, 4)
	base[0] = "PATH=/bin"
	env, drop := initEnv(base)
	if !drop || !slices.Equal(env, []string{"PATH=/bin", "GOMAXPROCS=1"}) {
		t.Errorf("initEnv(%q) = %q, %v", base, env, drop)
	}
	if got := base[:2][1]; got != "" {
		t.Errorf("initEnv wrote %q into the caller's array", got)
	}
	own := []string{"PATH=/bin", "GOMAXPROCS=3"}
	if env, drop := initEnv(own); drop || !slices.Equal(env, own) {
		t.Errorf("initEnv(%q) = %q, %v: want it unchanged", own, env, drop)
	}
}
