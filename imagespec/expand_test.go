package imagespec

import (
	"errors"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func TestExpandVars(t *testing.T) {
	env := []string{"PATH=/usr/bin:/bin", "HOME=/root", "EMPTY=", "HOME=/home/app"}
	args := map[string]string{"VER": "1.2", "HOME": "/from-arg"}
	for in, want := range map[string]string{
		"/opt/bin:$PATH":          "/opt/bin:/usr/bin:/bin",
		"${HOME}/data":            "/home/app/data", // the later ENV wins, ENV over ARG
		"v$VER-x":                 "v1.2-x",
		"$UNSET/x":                "/x",
		"${UNSET:-dflt}":          "dflt",
		"${EMPTY:-dflt}":          "dflt",
		"${VER:-dflt}":            "1.2",
		"${VER:+set}":             "set",
		"${UNSET:+set}":           "",
		`\$HOME`:                  "$HOME",
		"price $5, 100$":          "price $5, 100$",
		"it's \"quoted\" $ alone": "it's \"quoted\" $ alone",
		"no vars":                 "no vars",
		"$PATH$VER":               "/usr/bin:/bin1.2",
	} {
		got, err := ExpandVars(in, env, args)
		if err != nil || got != want {
			t.Errorf("expand %q: %q %v, want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"${HOME", "${HOME:?err}", "${1X}", "${}"} {
		if _, err := ExpandVars(bad, env, args); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("expand %q: %v, want invalid argument", bad, err)
		}
	}
}
