package daemon_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestSnapshotEndToEnd: a running sandbox writes files, copies a binary,
// makes directories and deletes a file of its image; Snapshot (while its
// entrypoint keeps running) gives an image that create and Base() accept,
// showing all of it and the deletion; a second snapshot of the same state
// has the same digest; the layer holds none of chalkd's mount points (init
// socket, identity dir, /etc binds, the chalk binary), whiteouts of them
// neither; another org gets not_found creating from it, by reference or as
// the base of an image spec.
func TestSnapshotEndToEnd(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 4*time.Minute)

	sb := create(t, c, chalkcompute.WithEntrypoint("sh", "-c", "while true; do sleep 1; done"))
	mustExec(t, sb, "sh", "-c", strings.Join([]string{
		"mkdir -p /opt/tool/bin /data/empty",
		"cp /bin/busybox /opt/tool/bin/echo",
		"echo state-1 > /data/state.txt",
		"ln -s /data/state.txt /data/link",
		"rm /bin/cat",                  // a file of the image: a whiteout
		"echo junk > /run/chalk/extra", // under chalkd's mount point: not carried
	}, " && "))

	var phases []string
	img, err := sb.Snapshot(ctx, chalkcompute.SnapshotProgress(func(p *v1.SnapshotProgress) { phases = append(phases, p.Phase) }))
	if err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	if !strings.HasPrefix(img.Ref, "chalk.local/snapshot:") || !strings.HasPrefix(img.Digest, "sha256:") {
		t.Fatalf("snapshot image: %+v", img)
	}
	if got := strings.Join(phases, ","); !strings.Contains(got, "freeze") || !strings.Contains(got, "push") || !strings.HasSuffix(got, "done") {
		t.Errorf("progress phases %q: want freeze, layer, push..., done", got)
	}
	// The source keeps running, thawed.
	if info, err := sb.Refresh(ctx); err != nil || info.State != "running" {
		t.Fatalf("source after snapshot: %v %+v", err, info)
	}
	mustExec(t, sb, "true")

	// Same state: same digest.
	again, err := sb.Snapshot(ctx)
	if err != nil || again.Digest != img.Digest || again.Ref != img.Ref {
		t.Fatalf("second snapshot of the same state: %v %+v, want %s", err, again, img.Digest)
	}

	// The CLI: text prints the reference (progress on stderr), -o json the image.
	out, stderr, code := n.CLI("compute", "sandbox", "snapshot", sb.ID())
	if code != 0 || strings.TrimSpace(out) != img.Ref || !strings.Contains(stderr, "push") {
		t.Errorf("cli snapshot: exit %d, out %q, stderr %q; want %s and push progress", code, out, stderr, img.Ref)
	}
	out, stderr, code = n.CLI("compute", "sandbox", "snapshot", sb.ID(), "-o", "json")
	var js struct{ Ref, Digest string }
	if code != 0 || json.Unmarshal([]byte(out), &js) != nil || js.Digest != img.Digest || js.Ref != img.Ref {
		t.Errorf("cli snapshot -o json: exit %d, out %q, stderr %q", code, out, stderr)
	}

	// The layer, read from the registry's storage: what was written, the
	// whiteout, and nothing of chalkd's.
	entries := snapshotLayer(t, n, img.Digest)
	for _, want := range []string{"opt/tool/bin/echo", "data/state.txt", "data/link", "data/empty/", "bin/.wh.cat"} {
		if _, ok := entries[want]; !ok {
			t.Errorf("layer lacks %s; has %v", want, keys(entries))
		}
	}
	for name, h := range entries {
		base := strings.TrimPrefix(filepath.Base(strings.TrimSuffix(name, "/")), ".wh.")
		p := filepath.Join(filepath.Dir(strings.TrimSuffix(name, "/")), base)
		for _, bad := range []string{".chalk", "run/chalk", "etc/hosts", "etc/hostname", "etc/resolv.conf", "usr/local/bin/chalk"} {
			if p == bad || strings.HasPrefix(p, bad+"/") {
				t.Errorf("layer carries chalkd's %s as %s", bad, name)
			}
		}
		if strings.Contains(name, "init.sock") || strings.Contains(name, "token") {
			t.Errorf("layer carries %s", name)
		}
		if h.Mode&0o6000 != 0 || h.Typeflag == tar.TypeChar || h.Typeflag == tar.TypeBlock || h.Typeflag == tar.TypeFifo {
			t.Errorf("layer entry %s: mode %o type %c", name, h.Mode, h.Typeflag)
		}
	}

	// create accepts the reference; Base() of an image spec too.
	for _, from := range []*chalkcompute.Image{chalkcompute.Base(img.Ref), chalkcompute.Base(img.Ref).Env(map[string]string{"FROM_SPEC": "1"})} {
		nb, err := c.Create(ctx, from)
		if err != nil {
			t.Fatalf("create from snapshot: %v", err)
		}
		out := mustExec(t, nb, "sh", "-c", "cat /data/state.txt; readlink /data/link; /opt/tool/bin/echo tool-ok; test -d /data/empty && echo dir-ok; test -e /bin/cat || echo cat-gone; cat /run/chalk/extra 2>/dev/null || echo no-extra")
		for _, want := range []string{"state-1", "/data/state.txt", "tool-ok", "dir-ok", "cat-gone", "no-extra"} {
			if !strings.Contains(out, want) {
				t.Errorf("sandbox from snapshot: %q lacks %q", out, want)
			}
		}
		if _, err := nb.Terminate(ctx); err != nil {
			t.Fatal(err)
		}
	}

	// Another org sees none of it.
	org, err := c.CreateOrg(ctx, "other", "olga")
	if err != nil {
		t.Fatal(err)
	}
	oc, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(org.AdminKey.Secret))
	if err != nil {
		t.Fatal(err)
	}
	for _, from := range []*chalkcompute.Image{chalkcompute.Base(img.Ref), chalkcompute.Base(img.Digest), chalkcompute.Base(img.LocalRef), chalkcompute.Base(img.Ref).Env(map[string]string{"X": "1"})} {
		if _, err := oc.Create(ctx, from); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("other org creates from the snapshot (%v): %v, want not found", from, err)
		}
	}
	if _, err := oc.Sandbox(ctx, sb.ID()); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("other org sees the sandbox: %v", err)
	}

	// A stopped sandbox's writable layer is kept for a while: the same
	// state gives the same digest.
	if _, err := sb.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := sb.Snapshot(ctx); err != nil || got.Digest != img.Digest {
		t.Errorf("snapshot of the stopped sandbox: %v %+v, want %s", err, got, img.Digest)
	}
}

// TestSnapshotStopped: files written, then the sandbox terminated: the CLI
// snapshots it, and a sandbox created from the
// image sees the files, none of chalkd's mounts (identity token, init
// socket); the kept layer is 0700 root's. After the grace period
// (--keep-stopped) the layer is gone from the node and a snapshot is
// failed_precondition; a layer kept when chalkd is killed is removed by the
// next start, and a sandbox over its org's budget (--keep-stopped-mb) is not
// kept at all.
func TestSnapshotStopped(t *testing.T) {
	n := chalktest.Start(t, "--keep-stopped", "3s", "--keep-stopped-mb", "2")
	c := n.Client()
	ctx := ctxT(t, 4*time.Minute)
	sb := create(t, c)
	mustExec(t, sb, "sh", "-c", "mkdir -p /work && echo kept-1 > /work/a.txt && printf '#!/bin/sh\\necho tool-ok\\n' > /work/tool && chmod +x /work/tool && ls /run/chalk/identity/ && test -S /.chalk/run/init.sock")
	if _, err := sb.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	// Its teardown (in the background) leaves only the layer, 0700.
	dir := filepath.Join(n.Dir, "sandboxes", sb.ID())
	deadline := time.Now().Add(30 * time.Second)
	for {
		ents, err := os.ReadDir(dir)
		st, serr := os.Stat(dir)
		if err == nil && serr == nil && len(ents) == 1 && ents[0].Name() == "upper" && st.Mode().Perm() == 0o700 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("kept layer dir: %v %v %v, want only upper/, 0700", ents, st, err)
		}
		time.Sleep(20 * time.Millisecond) // polling chalkd's background teardown
	}
	out, stderr, code := n.CLI("compute", "sandbox", "snapshot", sb.ID(), "-o", "json")
	var img struct{ Ref, Digest string }
	if code != 0 || json.Unmarshal([]byte(out), &img) != nil || img.Ref == "" {
		t.Fatalf("cli snapshot of a stopped sandbox: exit %d, %q %q", code, out, stderr)
	}
	entries := snapshotLayer(t, n, img.Digest)
	for name := range entries {
		if strings.Contains(name, "init.sock") || strings.Contains(name, "identity") || strings.HasPrefix(name, ".chalk") || strings.HasPrefix(name, "run/chalk") {
			t.Errorf("layer of the stopped sandbox carries %s", name)
		}
	}
	nb, err := c.Create(ctx, chalkcompute.Base(img.Ref))
	if err != nil {
		t.Fatal(err)
	}
	if got := mustExec(t, nb, "sh", "-c", "cat /work/a.txt && /work/tool"); got != "kept-1\ntool-ok\n" {
		t.Fatalf("from the stopped sandbox's snapshot: %q", got)
	}
	if _, err := nb.Terminate(ctx); err != nil {
		t.Fatal(err)
	}

	// The grace period (wall-clock time under test) passes: the node
	// removes the layer (polled), the snapshot is refused.
	deadline = time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(dir); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("kept layer %s still there after its grace period", dir)
		}
		time.Sleep(50 * time.Millisecond) // polling chalkd's work
	}
	if _, err := sb.Snapshot(ctx); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "kept for 3s") {
		t.Errorf("snapshot after the grace period: %v, want failed precondition naming it", err)
	}

	// Over the org's budget (2 MiB): a sandbox that wrote 3 MiB is not kept.
	big := create(t, c)
	mustExec(t, big, "sh", "-c", "dd if=/dev/zero of=/big bs=1M count=3 2>/dev/null")
	if _, err := big.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := big.Snapshot(ctx); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "at most 2 MiB") {
		t.Errorf("snapshot of a stopped sandbox over the budget: %v, want failed precondition naming the budget", err)
	}

	// kill -9 with a layer kept: the next start removes it.
	last := create(t, c)
	mustExec(t, last, "sh", "-c", "echo x > /x")
	if _, err := last.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	lastDir := filepath.Join(n.Dir, "sandboxes", last.ID())
	if _, err := os.Stat(lastDir); err != nil {
		t.Fatalf("layer not kept: %v", err)
	}
	n.Kill()
	n.Restart()
	c = n.Client()
	if _, err := os.Stat(lastDir); !os.IsNotExist(err) {
		t.Errorf("kept layer after a restart: %v", err)
	}
	if mounts, _ := n.Exec("sh", "-c", "grep -c "+n.Dir+"/sandboxes /proc/self/mountinfo || true"); strings.TrimSpace(mounts) != "0" {
		t.Errorf("mounts left after the restart: %s", mounts)
	}
	again, err := c.Sandbox(ctx, last.ID())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := again.Snapshot(ctx); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("snapshot after a restart: %v, want failed precondition", err)
	}
}

// snapshotLayer returns the entries of the last layer of the image with
// manifest digest d, read from the embedded registry's storage on disk.
func snapshotLayer(t *testing.T, n *chalktest.Node, d string) map[string]*tar.Header {
	t.Helper()
	blob := func(d string) []byte {
		hex := strings.TrimPrefix(d, "sha256:")
		ms, _ := filepath.Glob(filepath.Join(n.Dir, "registry", "*", "registry", "v2", "blobs", "sha256", hex[:2], hex, "data"))
		if len(ms) == 0 {
			ms, _ = filepath.Glob(filepath.Join(n.Dir, "registry", "**", "blobs", "sha256", hex[:2], hex, "data"))
		}
		if len(ms) == 0 {
			t.Fatalf("blob %s not found under %s", d, n.Dir)
		}
		b, err := os.ReadFile(ms[0])
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var m struct {
		Layers []struct {
			Digest string `json:"digest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(blob(d), &m); err != nil || len(m.Layers) == 0 {
		t.Fatalf("manifest %s: %v", d, err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob(m.Layers[len(m.Layers)-1].Digest)))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*tar.Header{}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = h
	}
}

func keys(m map[string]*tar.Header) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestPauseResume: a paused sandbox's counter (its own output) stops while
// a running one's advances; exec and file reads are refused with failed
// precondition while paused; resume lets it count again; a paused sandbox
// terminates; snapshot of a paused sandbox works and leaves it paused.
func TestPauseResume(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 3*time.Minute)
	counter := chalkcompute.WithEntrypoint("sh", "-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.05; done")
	sb := create(t, c, counter)
	ref := create(t, c, counter) // its ticks are the clock

	last := func(s *chalkcompute.Sandbox) int {
		var buf bytes.Buffer
		if err := s.Logs(ctx, &buf, false); err != nil {
			t.Fatal(err)
		}
		ls := strings.Fields(buf.String())
		for i := len(ls) - 1; i >= 0; i-- {
			if v, err := strconv.Atoi(ls[i]); err == nil {
				return v
			}
		}
		return 0
	}
	// waitTicks waits until s has printed more than v.
	waitTicks := func(s *chalkcompute.Sandbox, v int) int {
		for ctx.Err() == nil {
			if cur := last(s); cur > v {
				return cur
			}
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
		t.Fatalf("sandbox %s never printed past %d", s.ID(), v)
		return 0
	}
	waitTicks(sb, 2)

	info, err := sb.Pause(ctx)
	if err != nil || info.State != "paused" {
		t.Fatalf("pause: %v %+v", err, info)
	}
	if got, _ := c.Sandbox(ctx, sb.ID()); got.Info.State != "paused" {
		t.Errorf("get after pause: state %q", got.Info.State)
	}
	frozen := last(sb)
	// 20 ticks of the running sandbox later, the paused one has not moved.
	waitTicks(ref, last(ref)+20)
	if now := last(sb); now != frozen {
		t.Errorf("paused sandbox counted on: %d -> %d", frozen, now)
	}
	if _, err := sb.Exec(ctx, []string{"true"}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("exec while paused: %v, want failed precondition", err)
	}
	if _, err := sb.ReadFile(ctx, "/etc/passwd"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("read file while paused: %v, want failed precondition", err)
	}
	// Snapshot of a paused sandbox: works, and it stays paused.
	if _, err := sb.Snapshot(ctx); err != nil {
		t.Errorf("snapshot while paused: %v", err)
	}
	waitTicks(ref, last(ref)+5)
	if now := last(sb); now != frozen {
		t.Errorf("snapshot thawed a paused sandbox: %d -> %d", frozen, now)
	}

	// chalkd restarts: the paused sandbox is adopted, still paused.
	n.Stop()
	n.Restart()
	c = n.Client()
	if sb, err = c.Sandbox(ctx, sb.ID()); err != nil || sb.Info.State != "paused" {
		t.Fatalf("after restart: %v %+v", err, sb)
	}
	if ref, err = c.Sandbox(ctx, ref.ID()); err != nil || ref.Info.State != "running" {
		t.Fatalf("reference sandbox after restart: %v", err)
	}

	if info, err := sb.Resume(ctx); err != nil || info.State != "running" {
		t.Fatalf("resume: %v %+v", err, info)
	}
	waitTicks(sb, frozen+3)
	mustExec(t, sb, "true")

	// Terminate a paused sandbox (paused through the CLI).
	if out, stderr, code := n.CLI("compute", "sandbox", "pause", sb.ID()); code != 0 || !strings.Contains(out, "paused") {
		t.Fatalf("cli pause: exit %d, %q %q", code, out, stderr)
	}
	end, err := sb.Terminate(ctx)
	if err != nil || end.State != "stopped" {
		t.Fatalf("terminate paused: %v %+v", err, end)
	}
	if _, err := ref.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestSnapshotRunsc: on gVisor (--overlay2=none, so writes reach the host
// upper dir) a file written just before the snapshot is in it, and pause
// and resume work through runsc.
func TestSnapshotRunsc(t *testing.T) {
	runsc := runscBinary(t)
	n := chalktest.Start(t, "--runtime", "runsc", "--runtime-binary", runsc)
	c := n.Client()
	ctx := ctxT(t, 4*time.Minute)
	sb := create(t, c)
	mustExec(t, sb, "sh", "-c", "mkdir -p /data && echo gvisor-state > /data/s && rm /bin/vi")
	img, err := sb.Snapshot(ctx)
	if err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	nb, err := c.Create(ctx, chalkcompute.Base(img.Ref))
	if err != nil {
		t.Fatal(err)
	}
	if out := mustExec(t, nb, "sh", "-c", "cat /data/s; test -e /bin/vi || echo vi-gone"); !strings.Contains(out, "gvisor-state") || !strings.Contains(out, "vi-gone") {
		t.Errorf("sandbox from a gVisor snapshot: %q", out)
	}
	if info, err := sb.Pause(ctx); err != nil || info.State != "paused" {
		t.Fatalf("pause: %v %+v", err, info)
	}
	if _, err := sb.Exec(ctx, []string{"true"}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("exec while paused: %v", err)
	}
	if _, err := sb.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	mustExec(t, sb, "true")
	if _, err := sb.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if end, err := sb.Terminate(ctx); err != nil || end.State != "stopped" {
		t.Fatalf("terminate paused: %v %+v", err, end)
	}
}
