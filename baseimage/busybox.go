// Package baseimage builds the base images chalkcompute needs on machines
// without Docker Hub (busybox from the host's static busybox, a Debian
// bookworm Python image from the Debian mirror via debootstrap) and seeds
// them into the embedded registry.
package baseimage

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// BusyboxPath is the static busybox Busybox copies into the image (Debian's
// busybox-static package).
const BusyboxPath = "/bin/busybox"

// DefaultPath is the PATH of the base images.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

const (
	passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
	group  = "root:x:0:\nnogroup:x:65534:\n"
	hosts  = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
)

// sourceDateEpoch returns $SOURCE_DATE_EPOCH, or the Unix epoch if unset.
func sourceDateEpoch() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", s, errdefs.ErrInvalidArgument)
	}
	return time.Unix(n, 0).UTC(), nil
}

// Busybox builds a minimal single-layer image from the host's static busybox:
// /bin/busybox with one symlink per applet in /bin (so /bin/sh), /etc/passwd
// (root, nobody), /etc/group, /etc/hosts, /tmp (1777), /root, /home and the
// /dev, /proc, /sys mount points. The layer is reproducible (sorted entries,
// mtimes at $SOURCE_DATE_EPOCH or 0, uid/gid 0, no user names), so two builds
// from the same busybox binary have the same digest.
func Busybox(ctx context.Context) (v1.Image, error) {
	epoch, err := sourceDateEpoch()
	if err != nil {
		return nil, err
	}
	bin, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, fmt.Errorf("busybox %s (install busybox-static): %w: %w", BusyboxPath, errdefs.ErrFailedPrecondition, err)
	}
	out, err := exec.CommandContext(ctx, BusyboxPath, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w: %w", BusyboxPath, errdefs.ErrFailedPrecondition, err)
	}

	l := newMemLayer(epoch)
	for _, d := range []string{"bin", "dev", "etc", "home", "proc", "sys", "usr", "usr/bin", "usr/sbin", "sbin", "var"} {
		l.dir(d, 0o755)
	}
	l.dir("root", 0o700)
	l.dir("tmp", 0o1777)
	l.dir("var/tmp", 0o1777)
	l.file("bin/busybox", 0o755, bin)
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		l.symlink("bin/"+applet, "busybox")
	}
	if _, ok := l.entries["bin/sh"]; !ok {
		return nil, fmt.Errorf("%s has no sh applet: %w", BusyboxPath, errdefs.ErrFailedPrecondition)
	}
	l.file("etc/passwd", 0o644, []byte(passwd))
	l.file("etc/group", 0o644, []byte(group))
	l.file("etc/hosts", 0o644, []byte(hosts))

	tb, err := l.tar()
	if err != nil {
		return nil, err
	}
	layer, err := layerFromTar(tb)
	if err != nil {
		return nil, err
	}
	version := busyboxVersion(bin)
	cfg := v1.Config{
		Env: []string{"PATH=" + DefaultPath},
		Cmd: []string{"sh"},
	}
	if version != "" {
		cfg.Labels = map[string]string{"org.opencontainers.image.version": version}
	}
	return assemble(epoch, cfg, layer, "busybox "+version+" from "+BusyboxPath)
}

// busyboxVersion extracts "1.35.0" from the binary's banner, or "".
func busyboxVersion(bin []byte) string {
	const marker = "BusyBox v"
	i := bytes.Index(bin, []byte(marker))
	if i < 0 {
		return ""
	}
	rest := bin[i+len(marker):]
	j := bytes.IndexAny(rest, " \x00")
	if j < 0 || j > 40 {
		return ""
	}
	return string(rest[:j])
}

// assemble makes an OCI image of one layer with config cfg, created at epoch.
func assemble(epoch time.Time, cfg v1.Config, layer v1.Layer, createdBy string) (v1.Image, error) {
	base := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	img, err := mutate.Append(base, mutate.Addendum{
		// Hide the tarball layer's own Descriptor (it carries an empty,
		// non-nil annotations map that makes Manifest() disagree with the
		// serialised manifest).
		Layer:     plainLayer{layer},
		MediaType: types.OCILayer,
		History:   v1.History{Created: v1.Time{Time: epoch}, CreatedBy: createdBy, Comment: "chalkcompute baseimage"},
	})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Created = v1.Time{Time: epoch}
	cf.OS = "linux"
	cf.Architecture = runtime.GOARCH
	cf.Config = cfg
	return mutate.ConfigFile(img, cf)
}

// plainLayer exposes only the v1.Layer methods of a layer.
type plainLayer struct{ v1.Layer }
