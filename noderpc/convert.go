package noderpc

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"net/netip"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
)

// The conversions between api.Node's Go types and their messages, both ways.

func imageToPB(img *nodecache.Image) (*nodev1.Image, error) {
	cfg, err := json.Marshal(img.Config)
	if err != nil {
		return nil, fmt.Errorf("image %s config: %w", img.Digest, err)
	}
	out := &nodev1.Image{Ref: img.Ref, Digest: img.Digest, ConfigJson: cfg, Warm: img.Warm, BytesPulled: img.BytesPulled}
	for _, l := range img.Layers {
		out.Layers = append(out.Layers, &nodev1.Layer{Digest: l.Digest, DiffId: l.DiffID, Size: l.Size})
	}
	return out, nil
}

// imageFromPB is the control plane's copy of a node's image: everything but
// the layer directories, which stay the node's.
func imageFromPB(m *nodev1.Image) (*nodecache.Image, error) {
	img := &nodecache.Image{Ref: m.Ref, Digest: m.Digest, Warm: m.Warm, BytesPulled: m.BytesPulled}
	if len(m.ConfigJson) > 0 {
		var cfg v1.ConfigFile
		if err := json.Unmarshal(m.ConfigJson, &cfg); err != nil {
			return nil, fmt.Errorf("image %s: malformed config from the node: %v: %w", m.Digest, err, errdefs.ErrUnavailable)
		}
		img.Config = cfg
	}
	for _, l := range m.Layers {
		img.Layers = append(img.Layers, nodecache.Layer{Digest: l.Digest, DiffID: l.DiffId, Size: l.Size})
	}
	return img, nil
}

func startToPB(r node.StartRequest) *nodev1.StartSpec {
	s := &nodev1.StartSpec{
		Id: r.ID, Slot: int32(r.Slot), Entrypoint: r.Entrypoint, Env: r.Env, Workdir: r.Workdir, User: r.User,
		Cpu: r.CPU, Memory: r.Memory, Pids: r.Pids, DiskMb: r.DiskMB,
	}
	if r.Image != nil {
		s.ImageRef, s.ImageDigest = r.Image.Ref, r.Image.Digest
	}
	for _, b := range r.Binds {
		s.Binds = append(s.Binds, &nodev1.Bind{Source: b.Source, Dest: b.Dest, ReadOnly: b.ReadOnly})
	}
	for _, f := range r.Identity {
		s.IdentityFiles = append(s.IdentityFiles, &nodev1.IdentityFile{Name: f.Name, Audience: f.Audience, Content: f.Content})
	}
	return s
}

// startFromPB is the request without its image (the server looks it up).
func startFromPB(s *nodev1.StartSpec) node.StartRequest {
	r := node.StartRequest{
		ID: s.Id, Slot: int(s.Slot), Entrypoint: s.Entrypoint, Env: s.Env, Workdir: s.Workdir, User: s.User,
		CPU: s.Cpu, Memory: s.Memory, Pids: s.Pids, DiskMB: s.DiskMb,
	}
	for _, b := range s.Binds {
		r.Binds = append(r.Binds, sandbox.Bind{Source: b.Source, Dest: b.Dest, ReadOnly: b.ReadOnly})
	}
	for _, f := range s.IdentityFiles {
		r.Identity = append(r.Identity, node.IdentityFile{Name: f.Name, Audience: f.Audience, Content: f.Content})
	}
	return r
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func parseAddr(field, s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("net %s %q from the node: %v: %w", field, s, err, errdefs.ErrUnavailable)
	}
	return a, nil
}

func netToPB(n *sandboxnet.Net) *nodev1.Net {
	if n == nil {
		return nil
	}
	m := &nodev1.Net{
		Id: n.ID, Slot: int32(n.Slot), NetnsPath: n.NetnsPath, HostIf: n.HostIf,
		HostIp: addrString(n.HostIP), SandboxIp: addrString(n.SandboxIP),
		HostIp6: addrString(n.HostIP6), SandboxIp6: addrString(n.SandboxIP6),
	}
	if n.UserNS != nil {
		m.UserNs = &nodev1.UserNS{Path: n.UserNS.Path, HostId: n.UserNS.HostID, Size: n.UserNS.Size}
	}
	return m
}

func netFromPB(m *nodev1.Net) (*sandboxnet.Net, error) {
	if m == nil {
		return nil, nil
	}
	n := &sandboxnet.Net{ID: m.Id, Slot: int(m.Slot), NetnsPath: m.NetnsPath, HostIf: m.HostIf}
	var err error
	if n.HostIP, err = parseAddr("host_ip", m.HostIp); err != nil {
		return nil, err
	}
	if n.SandboxIP, err = parseAddr("sandbox_ip", m.SandboxIp); err != nil {
		return nil, err
	}
	if n.HostIP6, err = parseAddr("host_ip6", m.HostIp6); err != nil {
		return nil, err
	}
	if n.SandboxIP6, err = parseAddr("sandbox_ip6", m.SandboxIp6); err != nil {
		return nil, err
	}
	if m.UserNs != nil {
		n.UserNS = &sandboxnet.UserNS{Path: m.UserNs.Path, HostID: m.UserNs.HostId, Size: m.UserNs.Size}
	}
	return n, nil
}

func execToPB(id string, r procapi.ExecRequest) *nodev1.ExecSpec {
	s := &nodev1.ExecSpec{SandboxId: id, Argv: r.Argv, Env: r.Env, Dir: r.Dir, Stdin: r.Stdin, User: r.User, Wait: r.Wait}
	if r.PTY != nil {
		s.Pty = &nodev1.PTY{Rows: uint32(r.PTY.Rows), Cols: uint32(r.PTY.Cols), Term: r.PTY.Term}
	}
	return s
}

func execFromPB(s *nodev1.ExecSpec) (procapi.ExecRequest, error) {
	r := procapi.ExecRequest{Argv: s.Argv, Env: s.Env, Dir: s.Dir, Stdin: s.Stdin, User: s.User, Wait: s.Wait}
	if s.Pty != nil {
		if s.Pty.Rows > 0xffff || s.Pty.Cols > 0xffff {
			return r, fmt.Errorf("pty %dx%d: out of range: %w", s.Pty.Rows, s.Pty.Cols, errdefs.ErrInvalidArgument)
		}
		r.PTY = &procapi.PTY{Rows: uint16(s.Pty.Rows), Cols: uint16(s.Pty.Cols), Term: s.Pty.Term}
	}
	return r, nil
}

func fileInfoToPB(fi procapi.FileInfo) *nodev1.FileInfo {
	return &nodev1.FileInfo{Name: fi.Name, Size: fi.Size, Mode: uint32(fi.Mode), ModTimeUnixNano: fi.ModTime.UnixNano(), IsDir: fi.IsDir}
}

func fileInfoFromPB(m *nodev1.FileInfo) procapi.FileInfo {
	return procapi.FileInfo{Name: m.Name, Size: m.Size, Mode: fs.FileMode(m.Mode), ModTime: time.Unix(0, m.ModTimeUnixNano).UTC(), IsDir: m.IsDir}
}

func liveToPB(live map[string]int) map[string]int32 {
	out := make(map[string]int32, len(live))
	for k, v := range live {
		out[k] = int32(v)
	}
	return out
}

func liveFromPB(live map[string]int32) map[string]int {
	out := make(map[string]int, len(live))
	for k, v := range live {
		out[k] = int(v)
	}
	return out
}

func exitToPB(e sandbox.Exit) *nodev1.WaitResponse {
	return &nodev1.WaitResponse{Code: int32(e.Code), Signal: e.Signal, Oom: e.OOM, Known: e.Known}
}

func exitFromPB(m *nodev1.WaitResponse) sandbox.Exit {
	return sandbox.Exit{Code: int(m.Code), Signal: m.Signal, OOM: m.Oom, Known: m.Known}
}

func snapshotResultFromPB(m *nodev1.SnapshotResult) *imagebuild.SnapshotResult {
	return &imagebuild.SnapshotResult{Ref: m.Ref, LocalRef: m.LocalRef, Digest: m.Digest, DiffID: m.DiffId, Size: m.Size}
}
