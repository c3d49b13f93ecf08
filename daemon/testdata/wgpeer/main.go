// Command wgpeer is the external WireGuard peer of the tunnel tests: what
// `wg-quick up` does with wireguard-go, in the current network namespace.
//
//	wgpeer -key PRIVATE_KEY_BASE64 [-ifname wgp0] CONFIG
//
// It reads the wg-quick file chalkd returned for the peer (its PrivateKey
// line is a placeholder: the key is the peer's own, given with -key), brings
// the interface up with the Address, a route per peer AllowedIPs, prints
// "ready" and runs until its stdin closes.
package main

import (
	"bufio"
	"encoding/base64"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
)

type peer struct {
	key, endpoint, keepalive string
	allowed                  []string
}

func main() {
	key := flag.String("key", "", "private key, base64")
	ifname := flag.String("ifname", "wgp0", "interface name")
	flag.Parse()
	if err := run(*key, *ifname, flag.Arg(0)); err != nil {
		fmt.Fprintln(os.Stderr, "wgpeer:", err)
		os.Exit(1)
	}
}

func hexKey(b64 string) (string, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
	if err != nil || len(b) != 32 {
		return "", fmt.Errorf("bad key %q", b64)
	}
	return hex.EncodeToString(b), nil
}

func run(key, ifname, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var (
		addrs      []string
		listen     = "0"
		peers      []*peer
		section    string
		priv, err2 = hexKey(key)
	)
	if err2 != nil {
		return err2
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = strings.TrimSpace(line[:i])
		}
		switch {
		case line == "":
			continue
		case line == "[Interface]" || line == "[Peer]":
			section = line
			if section == "[Peer]" {
				peers = append(peers, &peer{})
			}
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return fmt.Errorf("%s: bad line %q", path, line)
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch section + k {
		case "[Interface]Address":
			addrs = append(addrs, strings.Split(v, ",")...)
		case "[Interface]ListenPort":
			listen = v
		case "[Interface]PrivateKey":
			// The placeholder: the key is ours, from -key.
		case "[Peer]PublicKey":
			h, err := hexKey(v)
			if err != nil {
				return err
			}
			peers[len(peers)-1].key = h
		case "[Peer]AllowedIPs":
			for _, a := range strings.Split(v, ",") {
				peers[len(peers)-1].allowed = append(peers[len(peers)-1].allowed, strings.TrimSpace(a))
			}
		case "[Peer]Endpoint":
			ua, err := net.ResolveUDPAddr("udp", v)
			if err != nil {
				return err
			}
			peers[len(peers)-1].endpoint = ua.String()
		case "[Peer]PersistentKeepalive":
			peers[len(peers)-1].keepalive = v
		default:
			return fmt.Errorf("%s: unexpected %s in %s", path, k, section)
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	td, err := tun.CreateTUN(ifname, 1420)
	if err != nil {
		return err
	}
	dev := device.NewDevice(td, conn.NewDefaultBind(), device.NewLogger(device.LogLevelSilent, ""))
	defer dev.Close()
	var uapi strings.Builder
	fmt.Fprintf(&uapi, "private_key=%s\nlisten_port=%s\n", priv, listen)
	for _, p := range peers {
		fmt.Fprintf(&uapi, "public_key=%s\n", p.key)
		if p.endpoint != "" {
			fmt.Fprintf(&uapi, "endpoint=%s\n", p.endpoint)
		}
		if p.keepalive != "" {
			fmt.Fprintf(&uapi, "persistent_keepalive_interval=%s\n", p.keepalive)
		}
		for _, a := range p.allowed {
			fmt.Fprintf(&uapi, "allowed_ip=%s\n", a)
		}
	}
	if err := dev.IpcSet(uapi.String()); err != nil {
		return err
	}
	if err := dev.Up(); err != nil {
		return err
	}
	cmds := [][]string{}
	for _, a := range addrs {
		cmds = append(cmds, []string{"addr", "add", strings.TrimSpace(a), "dev", ifname})
	}
	cmds = append(cmds, []string{"link", "set", ifname, "up"})
	for _, p := range peers {
		for _, a := range p.allowed {
			cmds = append(cmds, []string{"route", "replace", a, "dev", ifname})
		}
	}
	for _, c := range cmds {
		if out, err := exec.Command("ip", c...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(c, " "), err, out)
		}
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}
