package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
)

// idRange reads a sandbox's uid_map or gid_map from inside: "0 <host> <size>".
func idRange(t *testing.T, sb *chalkcompute.Sandbox, file string) (host, size uint64) {
	t.Helper()
	f := strings.Fields(mustExec(t, sb, "cat", "/proc/self/"+file))
	if len(f) != 3 || f[0] != "0" {
		t.Fatalf("%s of %s: %q, want one line mapping 0", file, sb.ID(), f)
	}
	host, _ = strconv.ParseUint(f[1], 10, 32)
	size, _ = strconv.ParseUint(f[2], 10, 32)
	return host, size
}

// initPid is the host pid of a sandbox's init, from runc.
func initPid(t *testing.T, n *chalktest.Node, id string) int {
	t.Helper()
	out, err := exec.Command("runc", "--root", filepath.Join(n.RunDir, "runc"), "state", id).Output()
	if err != nil {
		t.Fatalf("runc state %s: %v", id, err)
	}
	var st struct{ Pid int }
	if err := json.Unmarshal(out, &st); err != nil || st.Pid == 0 {
		t.Fatalf("runc state %s: %q %v", id, out, err)
	}
	return st.Pid
}

// asHostUID runs a shell script on the host as uid:gid with no
// supplementary groups: what a process escaped from a sandbox would be.
func asHostUID(t *testing.T, uid uint64, script string) (string, error) {
	t.Helper()
	cmd := exec.Command("sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestEscapeUserNamespace: a sandbox's root is an unprivileged host uid of a
// range no other sandbox has; the shared image layers read as the sandbox's
// own; and a process with a sandbox's host uid (as after an escape) can
// touch neither the node's secrets nor another sandbox's files.
func TestEscapeUserNamespace(t *testing.T) {
	n := chalktest.Start(t)
	if onGVisor(n) {
		t.Skip("nodes running gVisor do not use user namespaces (the Sentry runs unprivileged already)")
	}
	c := n.Client()
	a, b := create(t, c), create(t, c)

	ua, size := idRange(t, a, "uid_map")
	ga, _ := idRange(t, a, "gid_map")
	ub, _ := idRange(t, b, "uid_map")
	if size != sandboxnet.IDsPerSandbox || ua < sandboxnet.DefaultUIDBase || ga != ua {
		t.Fatalf("sandbox a maps uid 0 to %d (gid %d), %d ids; want a range of %d at or above %d", ua, ga, size, sandboxnet.IDsPerSandbox, sandboxnet.DefaultUIDBase)
	}
	if ub < ua+size && ua < ub+size {
		t.Fatalf("ranges overlap: a %d+%d, b %d+%d", ua, size, ub, size)
	}
	// Inside, root is root, and the image's files (extracted once, owned by
	// uid 0 on disk) are root's.
	if got := mustExec(t, a, "sh", "-c", "id -u; id -g; stat -c %u:%g /bin/busybox /etc/passwd"); got != "0\n0\n0:0\n0:0\n" {
		t.Fatalf("ids inside: %q", got)
	}
	// On the host, the sandbox's processes run as its range.
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", initPid(t, n, a.ID())))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) == 5 && (f[0] == "Uid:" || f[0] == "Gid:") {
			for _, id := range f[1:] {
				if id != strconv.FormatUint(ua, 10) {
					t.Errorf("init of a on the host: %s, want %d everywhere", line, ua)
				}
			}
		}
	}
	// What the sandbox writes lands in its upper dir with ids of its range;
	// root can change a file of the shared image (copy-up), which the other
	// sandbox does not see.
	mustExec(t, a, "sh", "-c", "echo mine > /mine && touch /theirs && chown 1000:2000 /theirs && echo 'x:x:7:7::/:/bin/sh' >> /etc/passwd")
	upperA := filepath.Join(n.Dir, "sandboxes", a.ID(), "upper")
	for f, want := range map[string][2]uint64{"mine": {ua, ua}, "theirs": {ua + 1000, ua + 2000}, "etc/passwd": {ua, ua}} {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(upperA, f), &st); err != nil || uint64(st.Uid) != want[0] || uint64(st.Gid) != want[1] {
			t.Errorf("host view of a's /%s: %d:%d (%v), want %d:%d", f, st.Uid, st.Gid, err, want[0], want[1])
		}
	}
	if got := mustExec(t, b, "sh", "-c", "grep -c '^x:' /etc/passwd; true"); got != "0\n" {
		t.Errorf("b sees a's change to the shared image: %q", got)
	}

	// After an escape: a process with a's root's host ids.
	upperB := filepath.Join(n.Dir, "sandboxes", b.ID(), "upper")
	if err := os.WriteFile(filepath.Join(upperB, "b-secret"), []byte("b's data"), 0o666); err != nil {
		t.Fatal(err)
	}
	own, err := asHostUID(t, ua, "cat "+filepath.Join(upperA, "mine"))
	if err != nil || own != "mine\n" {
		t.Fatalf("a's host uid reading a's own file: %q %v (the test's premise)", own, err)
	}
	for _, tc := range []struct{ name, script string }{
		{"read b's file (world-writable)", "cat " + filepath.Join(upperB, "b-secret")},
		{"write into b's layer", "echo x > " + filepath.Join(upperB, "planted")},
		{"list b's layer", "ls " + upperB},
		{"b's identity token", "cat " + filepath.Join(n.Dir, "identity-files", b.ID(), "files", "token")},
		{"list the identity dirs", "ls " + filepath.Join(n.Dir, "identity-files", b.ID())},
		{"the admin token", "cat " + filepath.Join(n.Dir, "admin.token")},
		{"the store", "cat " + filepath.Join(n.Dir, "chalk.db") + " >/dev/null"},
		{"the MCP credential key", "cat " + filepath.Join(n.Dir, "mcp-gateway.key")},
		{"list the data dir", "ls " + n.Dir},
		{"the registry", "ls " + filepath.Join(n.Dir, "registry")},
		{"the host's files", "echo x >> /etc/passwd"},
		{"the host's shadow", "cat /etc/shadow"},
		{"b's init", fmt.Sprintf("kill -0 %d", initPid(t, n, b.ID()))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := asHostUID(t, ua, tc.script)
			if err == nil {
				t.Fatalf("%q as a's host uid %d succeeded: %q", tc.script, ua, out)
			}
			if !strings.Contains(strings.ToLower(out), "permission denied") && !strings.Contains(strings.ToLower(out), "not permitted") {
				t.Errorf("%q: %q, want permission denied / not permitted", tc.script, out)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(upperB, "planted")); err == nil {
		t.Error("a's host uid planted a file in b's layer")
	}
	// The identity files are readable inside by every user (the 0710
	// wrapper is on the host side only). They are the node's files,
	// bind-mounted read-only, so inside they belong to the overflow id.
	for _, sb := range []*chalkcompute.Sandbox{a, b} {
		if got := mustExec(t, sb, "stat", "-c", "%a", "/run/chalk/identity", "/run/chalk/identity/token"); got != "755\n644\n" {
			t.Errorf("%s: modes of the identity dir and token inside: %q, want 755 and 644", sb.ID(), got)
		}
	}
}

// TestBuildUnderUserNamespace: RUN steps run in a user namespace too, and
// the layers they make carry the ids the step saw (not the host range):
// a sandbox of the built image sees them unchanged.
func TestBuildUnderUserNamespace(t *testing.T) {
	n := chalktest.Start(t)
	if onGVisor(n) {
		t.Skip("nodes running gVisor do not use user namespaces")
	}
	c := n.Client()
	img := chalkcompute.Base("busybox").RunCommands(
		"echo $(cat /proc/self/uid_map) > /build-map",
		"touch /by-root && touch /by-app && chown 1234:4321 /by-app && mkdir /data && chown 65535:65535 /data")
	sb, err := c.Create(ctxT(t, 2*time.Minute), img)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = sb.Terminate(context.Background()) })
	if got := mustExec(t, sb, "stat", "-c", "%n %u:%g", "/by-root", "/by-app", "/data"); got != "/by-root 0:0\n/by-app 1234:4321\n/data 65535:65535\n" {
		t.Fatalf("ids in the built image: %q", got)
	}
	// The build step itself ran mapped (a range of 65536 ids, not the host's root).
	f := strings.Fields(mustExec(t, sb, "cat", "/build-map"))
	if len(f) != 3 || f[0] != "0" || f[1] == "0" || f[2] != strconv.Itoa(sandboxnet.IDsPerSandbox) {
		t.Fatalf("uid_map of the build step: %q", f)
	}
}
