package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// busyboxBundle makes an OCI bundle whose rootfs is the same busybox the
// seeded image is made of, with runc's default spec running `true`.
func busyboxBundle(work string) (string, error) {
	bundle := filepath.Join(work, "bundle")
	rootfs := filepath.Join(bundle, "rootfs")
	for _, d := range []string{"bin", "proc", "sys", "dev", "tmp", "etc"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			return "", err
		}
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return "", fmt.Errorf("busybox-static is needed: %w", err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin", "busybox"), bb, 0o755); err != nil {
		return "", err
	}
	for _, a := range []string{"sh", "true", "sleep"} {
		if err := os.Symlink("busybox", filepath.Join(rootfs, "bin", a)); err != nil {
			return "", err
		}
	}
	cmd := exec.Command("runc", "spec")
	cmd.Dir = bundle
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("runc spec: %v %s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return "", err
	}
	var spec map[string]any
	if err := json.Unmarshal(b, &spec); err != nil {
		return "", err
	}
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = []string{"/bin/true"}
	proc["rlimits"] = []map[string]any{{"type": "RLIMIT_NOFILE", "hard": 20000, "soft": 20000}}
	b, _ = json.MarshalIndent(spec, "", " ")
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o644); err != nil {
		return "", err
	}
	// A second bundle running sleep, for runc exec.
	return bundle, nil
}

// runDetached starts a long-running container from the bundle (for runc exec).
func runDetached(work, bundle, id string) error {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return err
	}
	var spec map[string]any
	_ = json.Unmarshal(b, &spec)
	spec["process"].(map[string]any)["args"] = []string{"/bin/sleep", "3600"}
	spec["root"].(map[string]any)["path"] = filepath.Join(bundle, "rootfs")
	dir := filepath.Join(work, "bundle-sleep")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, _ = json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		return err
	}
	devnull, _ := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	defer devnull.Close()
	cmd := exec.Command("runc", "--root", filepath.Join(work, "runc"), "run", "-d", "--bundle", dir, id)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	return cmd.Run()
}

var podmanFlags = []string{"--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096", "--network", "none"}

// podmanMeasure times `podman run --rm IMG true` or `podman exec CTR true` on
// the same busybox rootfs imported into podman's storage.
func podmanMeasure(n int, work, mode string) ([]time.Duration, error) {
	if _, err := exec.LookPath("podman"); err != nil {
		return nil, fmt.Errorf("podman not installed (CHALK_BENCH_DEPS=1 scripts/deps.sh)")
	}
	img := "localhost/chalkbench-busybox:latest"
	if err := exec.Command("podman", "image", "exists", img).Run(); err != nil {
		tar := filepath.Join(work, "rootfs.tar")
		if err := run("tar", "-C", filepath.Join(work, "bundle", "rootfs"), "-cf", tar, "."); err != nil {
			return nil, err
		}
		if err := run("podman", "import", tar, img); err != nil {
			return nil, err
		}
	}
	if mode == "run" {
		args := append(append([]string{"podman", "run", "--rm"}, podmanFlags...), img, "/bin/true")
		if err := run(args...); err != nil {
			return nil, err
		}
		return measure(n, func() error { return run(args...) }, false), nil
	}
	name := "chalkbench-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	args := append(append([]string{"podman", "run", "-d", "--name", name}, podmanFlags...), img, "/bin/sleep", "3600")
	if err := run(args...); err != nil {
		return nil, err
	}
	defer exec.Command("podman", "rm", "-f", name).Run()
	if err := run("podman", "exec", name, "/bin/true"); err != nil {
		return nil, fmt.Errorf("podman exec: %s", strings.TrimSpace(err.Error()))
	}
	return measure(n, func() error { return run("podman", "exec", name, "/bin/true") }, false), nil
}
