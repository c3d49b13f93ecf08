package baseimage

import (
	"bufio"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/chalkcompute/chalkcompute/atomicfile"
	"github.com/chalkcompute/chalkcompute/errdefs"
)

// pythonSuite and pythonPackages define PythonSlim; changing them changes
// the cache key.
const (
	pythonSuite   = "bookworm"
	pythonBuilder = "baseimage/python-slim/v1"
)

var pythonPackages = []string{"python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates"}

// pythonMeta is stored next to the cached layer.
type pythonMeta struct {
	PythonVersion string `json:"python_version"`
	Mirror        string `json:"mirror"`
	Built         string `json:"built"`
}

// PythonSlim builds a Debian bookworm image with python3, pip and venv:
// debootstrap --variant=minbase from the Debian mirror configured in
// /etc/apt/sources.list*, with python3 python3-pip python3-venv
// python-is-python3 ca-certificates included. It needs root and the
// debootstrap package, and takes minutes, so the finished layer is kept in
// cacheDir and later calls only read it back. Progress lines go to logger
// (nil discards them).
//
// The image has PATH, LANG=C.UTF-8, PYTHON_VERSION and
// PIP_BREAK_SYSTEM_PACKAGES=1 (bookworm's pip refuses system installs
// otherwise, PEP 668), and Cmd ["python3"]; `python` and `pip` resolve.
// File mtimes are kept (clamping them would make every .pyc look stale).
func PythonSlim(ctx context.Context, cacheDir string, logger *slog.Logger) (v1.Image, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	epoch, err := sourceDateEpoch()
	if err != nil {
		return nil, err
	}
	if cacheDir == "" {
		return nil, fmt.Errorf("python slim: cacheDir is required: %w", errdefs.ErrInvalidArgument)
	}
	cacheDir, err = filepath.Abs(cacheDir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("python slim cache %s: %w", cacheDir, err)
	}
	mirror, err := DebianMirror()
	if err != nil {
		return nil, err
	}
	unlock, err := lockDir(ctx, cacheDir)
	if err != nil {
		return nil, err
	}
	defer unlock()

	key := cacheKey(mirror)
	layerPath := filepath.Join(cacheDir, "python-slim-"+key+".tar.gz")
	metaPath := filepath.Join(cacheDir, "python-slim-"+key+".json")
	meta, err := readMeta(metaPath)
	if err == nil {
		if _, err := os.Stat(layerPath); err == nil {
			logger.Info("python slim: using cached layer", "path", layerPath)
			return pythonImage(epoch, layerPath, meta)
		}
	}
	start := time.Now()
	logger.Info("python slim: building with debootstrap (takes minutes)", "mirror", mirror, "suite", pythonSuite)
	meta, err = buildPythonLayer(ctx, cacheDir, mirror, layerPath, logger)
	if err != nil {
		return nil, err
	}
	meta.Built = time.Now().UTC().Format(time.RFC3339)
	b, _ := json.Marshal(meta)
	if err := writeFileAtomic(metaPath, b); err != nil {
		return nil, err
	}
	logger.Info("python slim: built", "python", meta.PythonVersion, "took", time.Since(start).Round(time.Second))
	return pythonImage(epoch, layerPath, meta)
}

func cacheKey(mirror string) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n%s\n", pythonBuilder, pythonSuite, mirror, strings.Join(pythonPackages, ","))
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func readMeta(path string) (pythonMeta, error) {
	var m pythonMeta
	b, err := os.ReadFile(path)
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, err
	}
	if m.PythonVersion == "" {
		return m, errors.New("no python version")
	}
	return m, nil
}

func pythonImage(epoch time.Time, layerPath string, meta pythonMeta) (v1.Image, error) {
	layer, err := tarball.LayerFromFile(layerPath, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("python slim layer %s: %w", layerPath, err)
	}
	cfg := v1.Config{
		Env: []string{
			"PATH=" + DefaultPath,
			"LANG=C.UTF-8",
			"PYTHON_VERSION=" + meta.PythonVersion,
			"PIP_BREAK_SYSTEM_PACKAGES=1",
		},
		Cmd: []string{"python3"},
		Labels: map[string]string{
			"org.opencontainers.image.base.name": "debian:" + pythonSuite,
			"org.opencontainers.image.version":   meta.PythonVersion,
		},
	}
	return assemble(epoch, cfg, layer, "debootstrap --variant=minbase --include="+strings.Join(pythonPackages, ",")+" "+pythonSuite)
}

func buildPythonLayer(ctx context.Context, cacheDir, mirror, layerPath string, logger *slog.Logger) (pythonMeta, error) {
	if os.Geteuid() != 0 {
		return pythonMeta{}, fmt.Errorf("python slim: debootstrap needs root: %w", errdefs.ErrPermissionDenied)
	}
	debootstrap, err := exec.LookPath("debootstrap")
	if err != nil {
		return pythonMeta{}, fmt.Errorf("python slim: debootstrap not installed (apt-get install -y debootstrap): %w", errdefs.ErrFailedPrecondition)
	}
	debs := filepath.Join(cacheDir, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return pythonMeta{}, err
	}
	target, err := os.MkdirTemp(cacheDir, "rootfs-")
	if err != nil {
		return pythonMeta{}, err
	}
	defer func() {
		if err := removeRootfs(target); err != nil {
			logger.Warn("python slim: leaving build rootfs behind", "dir", target, "err", err)
		}
	}()

	cmd := exec.CommandContext(ctx, debootstrap,
		"--variant=minbase",
		"--components=main",
		"--include="+strings.Join(pythonPackages, ","),
		"--cache-dir="+debs,
		pythonSuite, target, mirror)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C")
	cmd.WaitDelay = 10 * time.Second
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	var tail lineTail
	var wg sync.WaitGroup
	wg.Go(func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			logger.Info("debootstrap", "line", sc.Text())
			tail.add(sc.Text())
		}
		_, _ = io.Copy(io.Discard, pr)
	})
	err = cmd.Run()
	pw.Close()
	wg.Wait()
	if err != nil {
		if log, rerr := os.ReadFile(filepath.Join(target, "debootstrap", "debootstrap.log")); rerr == nil {
			tail.add(lastLines(string(log), 10)...)
		}
		return pythonMeta{}, fmt.Errorf("python slim: debootstrap: %v: %s: %w", err, tail.String(), errdefs.ErrUnavailable)
	}

	ver, err := dpkgVersion(filepath.Join(target, "var/lib/dpkg/status"), "python3")
	if err != nil {
		return pythonMeta{}, err
	}
	if err := tidyRootfs(target); err != nil {
		return pythonMeta{}, err
	}
	for _, p := range []string{"usr/bin/python3", "usr/bin/python", "usr/bin/pip"} {
		if _, err := os.Stat(filepath.Join(target, p)); err != nil {
			return pythonMeta{}, fmt.Errorf("python slim: %s missing after debootstrap: %w", p, errdefs.ErrFailedPrecondition)
		}
	}

	logger.Info("python slim: writing layer", "path", layerPath)
	tmp, err := os.CreateTemp(cacheDir, ".layer-*")
	if err != nil {
		return pythonMeta{}, err
	}
	defer os.Remove(tmp.Name())
	zw := gzip.NewWriter(tmp)
	skip := func(rel string) bool {
		switch rel {
		case "dev", "proc", "sys", "run", "tmp", "var/tmp", "var/cache/apt/archives", "var/lib/apt/lists":
			return true
		}
		return false
	}
	if err := writeDirTar(zw, target, dirTarOptions{skipContents: skip}); err != nil {
		tmp.Close()
		return pythonMeta{}, fmt.Errorf("python slim: tar rootfs: %w", err)
	}
	if err := zw.Close(); err != nil {
		tmp.Close()
		return pythonMeta{}, err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return pythonMeta{}, err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return pythonMeta{}, err
	}
	if err := tmp.Close(); err != nil {
		return pythonMeta{}, err
	}
	if err := os.Rename(tmp.Name(), layerPath); err != nil {
		return pythonMeta{}, err
	}
	return pythonMeta{PythonVersion: ver, Mirror: mirror}, nil
}

// tidyRootfs drops host-specific files and caches debootstrap leaves behind,
// and makes sure `python` and `pip` resolve.
func tidyRootfs(root string) error {
	for _, p := range []string{"etc/hostname", "etc/resolv.conf"} {
		if err := os.Remove(filepath.Join(root, p)); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	for _, dir := range []string{"usr/share/doc", "usr/share/man", "usr/share/info", "var/cache/apt", "var/lib/apt/lists", "var/log"} {
		ents, err := os.ReadDir(filepath.Join(root, dir))
		if err != nil {
			continue
		}
		for _, e := range ents {
			if dir == "var/lib/apt/lists" && e.Name() == "partial" {
				continue
			}
			if dir == "var/cache/apt" && e.Name() == "archives" {
				continue
			}
			if err := os.RemoveAll(filepath.Join(root, dir, e.Name())); err != nil {
				return err
			}
		}
	}
	for link, target := range map[string]string{"usr/bin/python": "python3", "usr/bin/pip": "pip3"} {
		p := filepath.Join(root, link)
		if _, err := os.Lstat(p); os.IsNotExist(err) {
			if err := os.Symlink(target, p); err != nil {
				return err
			}
		}
	}
	return nil
}

// dpkgVersion returns the upstream version ("3.11.2") of pkg in a dpkg
// status file.
func dpkgVersion(statusPath, pkg string) (string, error) {
	b, err := os.ReadFile(statusPath)
	if err != nil {
		return "", fmt.Errorf("python slim: %w", err)
	}
	for para := range strings.SplitSeq(string(b), "\n\n") {
		var name, version string
		for line := range strings.SplitSeq(para, "\n") {
			if v, ok := strings.CutPrefix(line, "Package: "); ok {
				name = strings.TrimSpace(v)
			}
			if v, ok := strings.CutPrefix(line, "Version: "); ok {
				version = strings.TrimSpace(v)
			}
		}
		if name == pkg && version != "" {
			if i := strings.IndexByte(version, ':'); i >= 0 {
				version = version[i+1:]
			}
			if i := strings.LastIndexByte(version, '-'); i >= 0 {
				version = version[:i]
			}
			return version, nil
		}
	}
	return "", fmt.Errorf("python slim: package %s not in %s: %w", pkg, statusPath, errdefs.ErrNotFound)
}

// DebianMirror returns the Debian archive URL for bookworm configured in
// /etc/apt/sources.list and /etc/apt/sources.list.d (one-line and deb822
// formats).
func DebianMirror() (string, error) {
	files := []string{"/etc/apt/sources.list"}
	more, _ := filepath.Glob("/etc/apt/sources.list.d/*")
	files = append(files, more...)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var m string
		switch {
		case strings.HasSuffix(f, ".sources"):
			m = mirrorFromDeb822(string(b), pythonSuite)
		case strings.HasSuffix(f, ".list") || f == "/etc/apt/sources.list":
			m = mirrorFromOneLine(string(b), pythonSuite)
		}
		if m != "" {
			return m, nil
		}
	}
	return "", fmt.Errorf("no Debian %s mirror in /etc/apt/sources.list*: %w", pythonSuite, errdefs.ErrFailedPrecondition)
}

func mirrorFromOneLine(text, suite string) string {
	for line := range strings.SplitSeq(text, "\n") {
		f := strings.Fields(strings.TrimSpace(line))
		if len(f) < 3 || f[0] != "deb" {
			continue
		}
		f = f[1:]
		if strings.HasPrefix(f[0], "[") {
			for len(f) > 0 && !strings.HasSuffix(f[0], "]") {
				f = f[1:]
			}
			if len(f) == 0 {
				continue
			}
			f = f[1:]
		}
		if len(f) >= 2 && f[1] == suite {
			return strings.TrimSuffix(f[0], "/")
		}
	}
	return ""
}

func mirrorFromDeb822(text, suite string) string {
	for para := range strings.SplitSeq(text, "\n\n") {
		fields := map[string]string{}
		for line := range strings.SplitSeq(para, "\n") {
			if strings.HasPrefix(line, "#") {
				continue
			}
			k, v, ok := strings.Cut(line, ":")
			if ok && !strings.HasPrefix(line, " ") {
				fields[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
			}
		}
		if strings.EqualFold(fields["enabled"], "no") || !contains(strings.Fields(fields["types"]), "deb") {
			continue
		}
		if !contains(strings.Fields(fields["suites"]), suite) {
			continue
		}
		if uris := strings.Fields(fields["uris"]); len(uris) > 0 {
			return strings.TrimSuffix(uris[0], "/")
		}
	}
	return ""
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

// lockDir takes an exclusive flock on dir/.lock, so concurrent builds into
// the same cache wait for each other.
func lockDir(ctx context.Context, dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", dir, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", dir, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// removeRootfs removes a debootstrap target, first detaching anything still
// mounted under it (debootstrap mounts /proc and /sys in the target and may
// leave them if killed), so RemoveAll never walks into a host filesystem.
func removeRootfs(dir string) error {
	mounts, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		if err := syscall.Unmount(mounts[i], syscall.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount %s: %w", mounts[i], err)
		}
	}
	if mounts, err = mountsUnder(dir); err != nil || len(mounts) > 0 {
		return fmt.Errorf("still mounted under %s: %v %w", dir, mounts, err)
	}
	return os.RemoveAll(dir)
}

func mountsUnder(dir string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []string
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out, nil
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

func writeFileAtomic(path string, b []byte) error { return atomicfile.WriteFile(path, b, 0o644) }

// lineTail keeps the last lines of a command's output for error messages.
type lineTail struct {
	mu    sync.Mutex
	lines []string
}

func (t *lineTail) add(lines ...string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, lines...)
	if len(t.lines) > 10 {
		t.lines = t.lines[len(t.lines)-10:]
	}
}

func (t *lineTail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.Join(t.lines, " | ")
}

func lastLines(s string, n int) []string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}
