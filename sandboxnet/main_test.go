package sandboxnet

import (
	"os"
	"testing"

	"github.com/chalkcompute/chalkcompute/internal/nettest"
)

// TestMain runs the package's tests inside a throwaway node network
// namespace (as root), so the table, veths, sysctls and NAT never touch the
// host's.
func TestMain(m *testing.M) { os.Exit(nettest.Main(m)) }
