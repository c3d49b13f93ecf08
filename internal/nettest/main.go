package nettest

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

const inNodeEnv = "NETTEST_IN_NODE_NETNS"

// InNode reports whether this process is the copy Main started inside a
// throwaway node namespace.
func InNode() bool { return os.Getenv(inNodeEnv) != "" }

// Main runs the package's tests inside a fresh network namespace (the
// "node"), so nothing they do to routes, interfaces, sysctls under
// /proc/sys/net or nftables reaches the host. Use it from TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(nettest.Main(m)) }
//
// As root it creates the namespace, re-executes the test binary in it with
// the same arguments ("ip netns exec", so /sys and mounts are private too),
// deletes the namespace and returns the child's exit code. Not as root, or
// when already inside, it just runs the tests (root-only tests skip).
func Main(m *testing.M) int {
	if InNode() || os.Geteuid() != 0 {
		return m.Run()
	}
	name := UniqueName("ntnode-")
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "nettest: ip netns add %s: %v %s\n", name, err, out)
		return 1
	}
	defer func() { _ = exec.Command("ip", "netns", "del", name).Run() }()
	_ = exec.Command("ip", "-n", name, "link", "set", "lo", "up").Run()
	cmd := exec.Command("ip", append([]string{"netns", "exec", name, os.Args[0]}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), inNodeEnv+"=1")
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		fmt.Fprintf(os.Stderr, "nettest: run tests in netns %s: %v\n", name, err)
		return 1
	}
	return 0
}
