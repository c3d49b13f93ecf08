package chalktest

import (
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Fleet tests: a control plane (`chalkd control`) and node agents (`chalkd
// node`), each in its own network namespace with its own data dir, sandbox
// subnet and cgroup parent. Node i is linked to the control plane's netns by
// a veth pair on 10.251.i.0/30 (the control plane .1, the node .2).

// StartControl starts `chalkd control` (its fleet listener on :7450 of its
// netns).
func StartControl(t TB, extraArgs ...string) *Node {
	return StartOpts(t, Options{Mode: "control", Args: append([]string{"--fleet-listen", ":7450"}, extraArgs...)})
}

// JoinToken makes a join token on the control plane (in its store: the
// --database it runs with, if any).
func (n *Node) JoinToken() string {
	n.t.Helper()
	args := []string{"control", "token", "--data-dir", n.Dir}
	if i := slices.Index(n.Args, "--database"); i >= 0 && i+1 < len(n.Args) {
		args = append(args, "--database", n.Args[i+1])
	}
	out, err := exec.Command(filepath.Join(n.BinDir, "chalkd"), args...).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			n.t.Fatalf("chalkd control token: %v: %s", err, ee.Stderr)
		}
		n.t.Fatalf("chalkd control token: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// StartFleetNode starts node agent i (1..250) joined to control. It is
// seeded with no base image: it pulls every image from the control plane's
// registry.
func StartFleetNode(t TB, control *Node, i int) *Node {
	t.Helper()
	return StartFleetNodeWith(t, control, i, nil)
}

// ControlAddr is the control plane's address on node i's link (a private
// address the node reaches: its fleet listener is on port 7450 there).
func ControlAddr(i int) string { return fmt.Sprintf("10.251.%d.1", i) }

// StartFleetNodeWith is StartFleetNode with the node's uplink attached to
// inet (nil: none; one node per fake internet).
func StartFleetNodeWith(t TB, control *Node, i int, inet *FakeInternet) *Node {
	t.Helper()
	return startFleetNode(t, control, i, inet)
}

// StartFleetNodeArgs is StartFleetNode with more `chalkd node` flags.
func StartFleetNodeArgs(t TB, control *Node, i int, extraArgs ...string) *Node {
	t.Helper()
	return startFleetNode(t, control, i, nil, extraArgs...)
}

// StartFleetNodeEnv is StartFleetNodeArgs with more environment of chalkd
// (test hooks, KEY=value).
func StartFleetNodeEnv(t TB, control *Node, i int, env []string, extraArgs ...string) *Node {
	t.Helper()
	return startFleetNodeEnv(t, control, i, nil, env, extraArgs...)
}

func startFleetNode(t TB, control *Node, i int, inet *FakeInternet, extraArgs ...string) *Node {
	t.Helper()
	return startFleetNodeEnv(t, control, i, inet, nil, extraArgs...)
}

func startFleetNodeEnv(t TB, control *Node, i int, inet *FakeInternet, env []string, extraArgs ...string) *Node {
	t.Helper()
	ctlIP, nodeIP := ControlAddr(i), fmt.Sprintf("10.251.%d.2", i)
	tok := control.JoinToken()
	n := StartOpts(t, Options{Mode: "node", NoSeed: true, Internet: inet, Env: env, Before: func(n *Node) {
		run := func(args ...string) {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				t.Fatalf("ip %v: %v %s", args, err, out)
			}
		}
		veth := "fl" + randHex(3)
		run("-n", control.Netns, "link", "add", veth, "type", "veth", "peer", "name", veth+"n", "netns", n.Netns)
		run("-n", control.Netns, "addr", "add", ctlIP+"/30", "dev", veth)
		run("-n", control.Netns, "link", "set", veth, "up")
		run("-n", n.Netns, "addr", "add", nodeIP+"/30", "dev", veth+"n")
		run("-n", n.Netns, "link", "set", veth+"n", "up")
		n.Args = append(n.Args,
			"--join", "https://"+ctlIP+":7450", "--join-token", tok,
			"--node-listen", nodeIP+":7451", "--name", fmt.Sprintf("node%d", i),
			"--subnet", fmt.Sprintf("10.%d.0.0/16", 220+i))
		n.Args = append(n.Args, extraArgs...)
	}})
	waitHealthy(t, control, fmt.Sprintf("node%d", i))
	return n
}

// waitHealthy waits until the control plane lists node name as healthy
// (its router has seen a heartbeat: placement may use it), so a test's
// first create does not race the node's first heartbeat.
func waitHealthy(t TB, control *Node, name string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, errOut, code := control.CLI("admin", "node", "ls", "-o", "json")
		if code == 0 {
			var ns []struct {
				Name    string `json:"name"`
				Healthy bool   `json:"healthy"`
			}
			if err := json.Unmarshal([]byte(out), &ns); err != nil {
				t.Fatalf("node ls -o json: %v: %s", err, out)
			}
			for _, n := range ns {
				if n.Name == name && n.Healthy {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s not healthy on the control plane after 60 s: %s %s", name, out, errOut)
		}
		time.Sleep(100 * time.Millisecond) // polling the control plane for the node's first heartbeat
	}
}
