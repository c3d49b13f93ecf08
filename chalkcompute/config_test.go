package chalkcompute

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestOrgPicksKey: WithOrg (or CHALK_ORG) picks that org's key from the
// config file `chalk auth login` writes; the current org and a config from
// before teams use "token"; an org with no key is a clear error; an
// explicit token wins.
func TestOrgPicksKey(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "config.json")
	for _, k := range []string{"CHALK_API_URL", "CHALK_API_TOKEN", "CHALK_API_TOKEN_FILE", "CHALK_ORG"} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
	t.Setenv("CHALK_CONFIG", cfg)
	if err := WriteConfig(&FileConfig{APIURL: "unix:///x.sock", Token: "chalk_cur", Org: "default",
		Keys: map[string]string{"default": "chalk_cur", "acme": "chalk_acme"}}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(cfg); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("config mode: %v %v", fi, err)
	}
	for _, tc := range []struct {
		name  string
		env   string
		opts  []Option
		token string
		err   error
	}{
		{"current", "", nil, "chalk_cur", nil},
		{"WithOrg", "", []Option{WithOrg("acme")}, "chalk_acme", nil},
		{"CHALK_ORG", "acme", nil, "chalk_acme", nil},
		{"WithOrg over CHALK_ORG", "acme", []Option{WithOrg("default")}, "chalk_cur", nil},
		{"no key for the org", "", []Option{WithOrg("nope")}, "", errdefs.ErrUnauthenticated},
		{"explicit token", "", []Option{WithOrg("nope"), WithToken("chalk_given")}, "chalk_given", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("CHALK_ORG", tc.env)
			o, err := makeOptions(tc.opts)
			if !errors.Is(err, tc.err) || (err == nil && o.token != tc.token) {
				t.Fatalf("got %+v %v, want token %q err %v", o, err, tc.token, tc.err)
			}
		})
	}
	// A config from before teams: only api_url and token.
	if err := WriteConfig(&FileConfig{APIURL: "unix:///x.sock", Token: "chalk_old"}); err != nil {
		t.Fatal(err)
	}
	if o, err := makeOptions(nil); err != nil || o.token != "chalk_old" {
		t.Fatalf("pre-teams config: %+v %v", o, err)
	}
}
