package chalkcompute

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// Image describes an image: a base reference plus build steps. It is immutable:
// every method returns a new Image and never changes the receiver, so
// intermediate images can be shared and extended.
type Image struct {
	base          string
	pythonVersion string
	debianSlim    bool
	dockerfile    string
	context       string // digest of the Dockerfile directory's tar
	steps         []map[string]any
	mounts        []map[string]any
	uploads       []upload
	raw           []byte // a spec given as JSON (FromSpec)
	err           error
}

// upload is local content the server needs before building or starting.
type upload struct {
	digest string
	data   []byte
}

// Base is an arbitrary OCI image reference ("busybox", "node:22-slim", "ghcr.io/org/image:tag").
func Base(ref string) *Image { return &Image{base: ref} }

// DebianSlim is python:<version>-slim-bookworm; with no version, the server's default.
func DebianSlim(pythonVersion ...string) *Image {
	img := &Image{debianSlim: true}
	if len(pythonVersion) > 0 {
		img.pythonVersion = pythonVersion[0]
	}
	return img
}

// Ref is the image's base reference ("" for DebianSlim without steps).
func (i *Image) Ref() string { return i.base }

// clone returns a copy whose slices the caller may append to without touching i.
func (i *Image) clone() *Image {
	c := *i
	c.steps = append([]map[string]any(nil), i.steps...)
	c.mounts = append([]map[string]any(nil), i.mounts...)
	c.uploads = append([]upload(nil), i.uploads...)
	return &c
}

// withStep returns a new image with one more step.
func (i *Image) withStep(step map[string]any) *Image {
	c := i.clone()
	c.steps = append(c.steps, step)
	return c
}

// plain reports whether the image is just a reference (nothing to build).
func (i *Image) plain() bool {
	return i.raw == nil && !i.debianSlim && i.dockerfile == "" && len(i.steps) == 0 && len(i.mounts) == 0
}

// Spec returns the JSON spec the server canonicalises and hashes.
func (i *Image) Spec() ([]byte, error) {
	if i.err != nil {
		return nil, i.err
	}
	if i.raw != nil {
		return i.raw, nil
	}
	spec := map[string]any{"steps": i.steps}
	if i.steps == nil {
		spec["steps"] = []any{}
	}
	if i.debianSlim {
		spec["debian_slim"] = true
		if i.pythonVersion != "" {
			spec["python_version"] = i.pythonVersion
		}
	} else if i.base != "" {
		spec["base"] = i.base
	}
	if i.dockerfile != "" {
		spec["dockerfile"] = i.dockerfile
		if i.context != "" {
			spec["context"] = i.context
		}
	}
	if len(i.mounts) > 0 {
		spec["mounts"] = i.mounts
	}
	return json.Marshal(spec)
}

// apply fills the image part of a create request, uploading local content first.
func (i *Image) apply(ctx context.Context, c *Client, req *v1.CreateSandboxRequest) error {
	if i.err != nil {
		return i.err
	}
	if i.plain() {
		if i.base == "" {
			return fmt.Errorf("image: no base reference")
		}
		req.Image = i.base
		return nil
	}
	spec, err := i.Spec()
	if err != nil {
		return err
	}
	if err := checkSpec("image_spec_json", spec); err != nil {
		return err // before any upload
	}
	if err := c.uploadAll(ctx, i.uploads); err != nil {
		return err
	}
	req.ImageSpecJson = string(spec)
	return nil
}

// FromSpec is an image from a JSON spec as the SDKs send it (chalk compute image build --spec).
func FromSpec(spec []byte) *Image { return &Image{raw: append([]byte(nil), spec...)} }

// FromDockerfile parses an existing Dockerfile (server-side) and continues
// chaining on top. If it COPYs or ADDs local files, the Dockerfile's directory
// is uploaded as the build context.
func FromDockerfile(path string) *Image {
	b, err := os.ReadFile(path)
	if err != nil {
		return &Image{err: fmt.Errorf("from_dockerfile %s: %w", path, err)}
	}
	img := &Image{dockerfile: string(b)}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && (strings.EqualFold(f[0], "COPY") || strings.EqualFold(f[0], "ADD")) {
			ctx, err := dirTar(filepath.Dir(path))
			if err != nil {
				return &Image{err: fmt.Errorf("from_dockerfile %s: build context: %w", path, err)}
			}
			sum := sha256.Sum256(ctx)
			img.context = "sha256:" + hex.EncodeToString(sum[:])
			img.uploads = append(img.uploads, upload{digest: img.context, data: ctx})
			break
		}
	}
	return img
}

// Strategy says how local files get into a sandbox.
type Strategy string

const (
	// Mount uploads the files at sandbox start and bind-mounts them read-only;
	// they are not part of the image (nor its hash). The default.
	Mount Strategy = "mount"
	// Copy bakes the files into an image layer; their bytes are in the hash.
	Copy Strategy = "copy"
)

// RunCommands runs shell commands in a build step (apt, apk, anything).
func (i *Image) RunCommands(cmds ...string) *Image {
	return i.withStep(map[string]any{"kind": "run", "commands": append([]string(nil), cmds...)})
}

// PipInstall installs Python packages (requirement specifiers) with pip.
func (i *Image) PipInstall(pkgs ...string) *Image {
	return i.withStep(map[string]any{"kind": "pip_install", "packages": append([]string(nil), pkgs...)})
}

// PipInstallFromRequirements installs the requirements file at path (read now;
// its content is part of the hash).
func (i *Image) PipInstallFromRequirements(path string) *Image {
	b, err := os.ReadFile(path)
	if err != nil {
		c := i.clone()
		c.err = fmt.Errorf("pip_install_from_requirements %s: %w", path, err)
		return c
	}
	var pkgs []string
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if j := strings.Index(line, " #"); j >= 0 {
			line = strings.TrimSpace(line[:j])
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		pkgs = append(pkgs, line)
	}
	if len(pkgs) == 0 {
		c := i.clone()
		c.err = fmt.Errorf("pip_install_from_requirements %s: no requirements", path)
		return c
	}
	return i.PipInstall(pkgs...)
}

// AptInstall installs Debian packages.
func (i *Image) AptInstall(pkgs ...string) *Image {
	return i.withStep(map[string]any{"kind": "apt_install", "packages": append([]string(nil), pkgs...)})
}

// DockerfileCommands adds raw Dockerfile instructions (RUN, ENV, USER, EXPOSE, ...).
func (i *Image) DockerfileCommands(lines ...string) *Image {
	return i.withStep(map[string]any{"kind": "dockerfile", "lines": append([]string(nil), lines...)})
}

// Workdir sets the working directory.
func (i *Image) Workdir(dir string) *Image {
	return i.withStep(map[string]any{"kind": "workdir", "path": dir})
}

// Env sets environment variables. As in a Dockerfile's ENV, $NAME and
// ${NAME} in values take the value in force before this step (the base
// image's too), e.g. "PATH": "/opt/bin:$PATH"; \$ is a literal $.
func (i *Image) Env(env map[string]string) *Image {
	cp := make(map[string]string, len(env))
	for k, v := range env {
		cp[k] = v
	}
	return i.withStep(map[string]any{"kind": "env", "env": cp})
}

// User sets the user later steps and sandboxes run as.
func (i *Image) User(u string) *Image { return i.withStep(map[string]any{"kind": "user", "user": u}) }

// Entrypoint sets the image's entrypoint.
func (i *Image) Entrypoint(argv ...string) *Image {
	return i.withStep(map[string]any{"kind": "entrypoint", "argv": append([]string(nil), argv...)})
}

// Cmd sets the image's default command.
func (i *Image) Cmd(argv ...string) *Image {
	return i.withStep(map[string]any{"kind": "cmd", "argv": append([]string(nil), argv...)})
}

// Force marks the last step to be rebuilt (with every later one) even if cached.
func (i *Image) Force() *Image {
	c := i.clone()
	if n := len(c.steps); n > 0 {
		st := make(map[string]any, len(c.steps[n-1])+1)
		for k, v := range c.steps[n-1] {
			st[k] = v
		}
		st["force"] = true
		c.steps[n-1] = st
	}
	return c
}

// AddLocalFile puts the local file at remote (absolute path in the sandbox).
func (i *Image) AddLocalFile(local, remote string, strategy Strategy) *Image {
	b, err := os.ReadFile(local)
	if err != nil {
		c := i.clone()
		c.err = fmt.Errorf("add_local_file %s: %w", local, err)
		return c
	}
	st, _ := os.Stat(local)
	mode := 0o644
	if st != nil && st.Mode()&0o111 != 0 {
		mode = 0o755
	}
	return i.addContent(b, remote, false, mode, strategy)
}

// AddLocalDir puts the local directory's tree at remote.
func (i *Image) AddLocalDir(local, remote string, strategy Strategy) *Image {
	b, err := dirTar(local)
	if err != nil {
		c := i.clone()
		c.err = fmt.Errorf("add_local_dir %s: %w", local, err)
		return c
	}
	return i.addContent(b, remote, true, 0, strategy)
}

func (i *Image) addContent(b []byte, remote string, isDir bool, mode int, strategy Strategy) *Image {
	sum := sha256.Sum256(b)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	c := i.clone()
	c.uploads = append(c.uploads, upload{digest: digest, data: b})
	switch strategy {
	case Copy:
		st := map[string]any{"kind": "copy", "src": digest, "dst": remote}
		if isDir {
			st["is_dir"] = true
		} else {
			st["mode"] = mode
		}
		c.steps = append(c.steps, st)
	case Mount, "":
		m := map[string]any{"src": digest, "dst": remote}
		if isDir {
			m["is_dir"] = true
		} else {
			m["mode"] = mode
		}
		c.mounts = append(c.mounts, m)
	default:
		c.err = fmt.Errorf("strategy %q: want %q or %q", strategy, Mount, Copy)
	}
	return c
}

// dirTar is the reproducible tar of a directory described in docs/IMAGE_HASH.md.
func dirTar(root string) ([]byte, error) {
	var paths []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != root {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Slice(paths, func(a, b int) bool {
		ra, _ := filepath.Rel(root, paths[a])
		rb, _ := filepath.Rel(root, paths[b])
		return filepath.ToSlash(ra) < filepath.ToSlash(rb)
	})
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		rel, _ := filepath.Rel(root, p)
		rel = filepath.ToSlash(rel)
		fi, err := os.Lstat(p)
		if err != nil {
			return nil, err
		}
		h := &tar.Header{Name: rel, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		switch {
		case fi.IsDir():
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, rel+"/", 0o755
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return nil, err
			}
			h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, target, 0o777
		case fi.Mode().IsRegular():
			h.Typeflag, h.Size, h.Mode = tar.TypeReg, fi.Size(), 0o644
			if fi.Mode()&0o111 != 0 {
				h.Mode = 0o755
			}
		default:
			continue
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			f, err := os.Open(p)
			if err != nil {
				return nil, err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			if err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
