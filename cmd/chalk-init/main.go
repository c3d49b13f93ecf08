// Command chalk-init is PID 1 of every sandbox. It reaps zombies, runs the
// optional entrypoint (the sandbox ends when it exits, with its exit code) and
// serves the process API (package procapi) on a unix socket whose directory
// the host bind-mounts in. Build it static: CGO_ENABLED=0.
//
//	chalk-init [--socket /.chalk/run/init.sock] [--] [entrypoint argv...]
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/procapi"
)

func main() {
	socket := "/.chalk/run/init.sock"
	user := ""
	args := os.Args[1:]
	for len(args) > 0 {
		if args[0] == "--" {
			args = args[1:]
			break
		}
		if args[0] == "--socket" && len(args) > 1 {
			socket, args = args[1], args[2:]
			continue
		}
		if args[0] == "--user" && len(args) > 1 {
			user, args = args[1], args[2:]
			continue
		}
		break
	}
	reaper := procapi.NewReaper()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)

	_ = os.MkdirAll(filepath.Dir(socket), 0o755)
	_ = os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chalk-init:", err)
		os.Exit(1)
	}
	_ = os.Chmod(socket, 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		if err := procapi.Serve(ctx, l, procapi.ServerOptions{Reaper: reaper, DefaultUser: user}); err != nil {
			fmt.Fprintln(os.Stderr, "chalk-init: serve:", err)
		}
	}()

	var entry <-chan unix.WaitStatus
	var entryPid int
	if len(args) > 0 {
		bin, err := exec.LookPath(args[0])
		if err != nil {
			fmt.Fprintf(os.Stderr, "chalk-init: entrypoint %q: %v\n", args[0], err)
			os.Exit(127)
		}
		cred, err := procapi.ParseUser(user)
		if err != nil {
			fmt.Fprintln(os.Stderr, "chalk-init:", err)
			os.Exit(126)
		}
		devnull, _ := os.Open(os.DevNull)
		p, ch, err := reaper.Start(bin, args, &os.ProcAttr{Env: os.Environ(), Files: []*os.File{devnull, os.Stdout, os.Stderr},
			Sys: &syscall.SysProcAttr{Credential: cred}})
		if devnull != nil {
			devnull.Close()
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "chalk-init: start entrypoint: %v\n", err)
			os.Exit(126)
		}
		entry, entryPid = ch, p.Pid
	}
	for {
		select {
		case ws := <-entry:
			code := ws.ExitStatus()
			if ws.Signaled() {
				code = 128 + int(ws.Signal())
			}
			os.Exit(code)
		case sig := <-sigs:
			// Forward to every process in the sandbox, then end it.
			if entryPid != 0 {
				_ = unix.Kill(entryPid, sig.(syscall.Signal))
			}
			if os.Getpid() == 1 { // only inside the sandbox's PID namespace
				_ = unix.Kill(-1, sig.(syscall.Signal))
			}
			os.Exit(128 + int(sig.(syscall.Signal)))
		}
	}
}
