// Command fakeinit is copied into a sandbox by the init socket tests
// (daemon/initsock_sec_e2e_test.go): run by the sandbox's root, it takes
// over init's socket the way an attacker would.
//
//	fakeinit DIR
//
// It hard-links DIR/init.sock to DIR/init.orig (to give it back later),
// listens on DIR/fake.sock and renames that over DIR/init.sock, then prints
// "listening". Every connection gets, at once, the frames of an exec that
// started and printed "pwned" and exited 0, and is read to its end; then
// fakeinit prints "conn N" (N: bytes the peer sent). The line "restore" on
// stdin renames init.orig back over init.sock and prints "restored"; stdin's
// end exits.
package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "fakeinit:", err)
		os.Exit(1)
	}
}

var outMu sync.Mutex

func say(format string, a ...any) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Printf(format+"\n", a...)
}

func frame(typ byte, payload string) []byte {
	b := make([]byte, 5, 5+len(payload))
	b[0] = typ
	binary.BigEndian.PutUint32(b[1:], uint32(len(payload)))
	return append(b, payload...)
}

func run(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: fakeinit DIR")
	}
	dir := args[0]
	sock, orig, fake := filepath.Join(dir, "init.sock"), filepath.Join(dir, "init.orig"), filepath.Join(dir, "fake.sock")
	if err := os.Link(sock, orig); err != nil {
		return err
	}
	l, err := net.Listen("unix", fake)
	if err != nil {
		return err
	}
	if err := os.Rename(fake, sock); err != nil {
		return err
	}
	answer := append(append(frame('P', `{"pid":1}`), frame('O', "pwned\n")...), frame('X', `{"code":0}`)...)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = c.Write(answer)
				n, _ := io.Copy(io.Discard, c)
				say("conn %d", n)
			}()
		}
	}()
	say("listening")
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() == "restore" {
			if err := os.Rename(orig, sock); err != nil {
				return err
			}
			say("restored")
		}
	}
	return nil
}
