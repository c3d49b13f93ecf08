package daemon

import (
	"errors"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestDatabaseFlag: --database defaults to the SQLite file in the data dir,
// takes a postgres:// URL or an absolute path, and refuses anything else
// with an error naming it (its password redacted).
func TestDatabaseFlag(t *testing.T) {
	for _, tc := range []struct{ in, want, bad string }{
		{"", "/d/chalk.db", ""},
		{"/srv/chalk/state.db", "/srv/chalk/state.db", ""},
		{"postgres://chalk@/chalk?host=/run/postgresql", "postgres://chalk@/chalk?host=/run/postgresql", ""},
		{"postgresql://chalk:pw@db:5432/chalk", "postgresql://chalk:pw@db:5432/chalk", ""},
		{"chalk.db", "", `database "chalk.db"`},
		{"mysql://chalk:pw@db/chalk", "", "want a postgres:// URL"},
	} {
		c := Config{DataDir: "/d", Database: tc.in}
		err := c.defaults()
		if tc.bad == "" {
			if err != nil || c.Database != tc.want {
				t.Errorf("--database %q: %q %v, want %q", tc.in, c.Database, err, tc.want)
			}
			continue
		}
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.bad) || strings.Contains(err.Error(), ":pw@") {
			t.Errorf("--database %q: %v, want invalid argument naming %q", tc.in, err, tc.bad)
		}
	}
}
