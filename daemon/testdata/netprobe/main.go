// Command netprobe is copied into sandboxes by the tunnel tests (busybox has
// no UDP client or server).
//
//	netprobe serve PORT                TCP and UDP echo on PORT; prints "udp SRC MSG" per datagram; exits on "quit"
//	netprobe tcp ADDR MSG              dial (retrying up to 10s), send MSG, print the echo
//	netprobe udp ADDR MSG              send MSG (every 100ms, up to 10s) until the echo arrives; print it
//	netprobe udp-from SRC ADDR MSG     send one datagram with source address SRC (IP_FREEBIND: no privilege needed)
//	netprobe tcp-once ADDR MSG         one dial with a 2s timeout
//	netprobe sink PORT                 TCP: read every connection to its end, then close it
//	netprobe blast ADDR MIB            TCP: send MIB MiB to a sink; print "gbit/s N" once the sink has it all
//
// chalkbench builds it too, for the tunnel throughput benchmark.
package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "netprobe:", err)
		os.Exit(1)
	}
}

func run(a []string) error {
	if len(a) == 0 {
		return fmt.Errorf("usage")
	}
	switch a[0] {
	case "serve":
		return serve(a[1])
	case "tcp":
		return tcpEcho(a[1], a[2], 10*time.Second)
	case "tcp-once":
		return tcpEcho(a[1], a[2], 0)
	case "udp":
		return udpEcho(a[1], a[2])
	case "udp-from":
		return udpFrom(a[1], a[2], a[3])
	case "sink":
		return sink(a[1])
	case "blast":
		mib, err := strconv.Atoi(a[2])
		if err != nil {
			return err
		}
		return blast(a[1], mib)
	}
	return fmt.Errorf("unknown command %q", a[0])
}

func serve(port string) error {
	l, err := net.Listen("tcp4", ":"+port)
	if err != nil {
		return err
	}
	pc, err := net.ListenPacket("udp4", ":"+port)
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				fmt.Fprintf(c, "echo %s", line)
			}()
		}
	}()
	fmt.Println("ready")
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		msg := string(buf[:n])
		fmt.Printf("udp %s %s\n", from.(*net.UDPAddr).IP, msg)
		pc.WriteTo([]byte("echo "+msg), from)
		if msg == "quit" {
			return nil
		}
	}
}

func tcpEcho(addr, msg string, retry time.Duration) error {
	deadline := time.Now().Add(retry)
	for {
		c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
		if err != nil {
			if time.Now().Before(deadline) {
				time.Sleep(50 * time.Millisecond) // the server may not listen yet
				continue
			}
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintln(c, msg)
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return err
		}
		fmt.Print(line)
		return nil
	}
}

func udpEcho(addr, msg string) error {
	c, err := net.Dial("udp4", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 1500)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c.Write([]byte(msg))
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		n, err := c.Read(buf)
		if err == nil {
			fmt.Println(string(buf[:n]))
			return nil
		}
	}
	return fmt.Errorf("no echo from %s", addr)
}

func udpFrom(src, addr, msg string) error {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, syscall.IP_FREEBIND, 1) })
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp4", net.JoinHostPort(src, "0"))
	if err != nil {
		return err
	}
	defer pc.Close()
	ua, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return err
	}
	_, err = pc.WriteTo([]byte(strings.TrimSpace(msg)), ua)
	return err
}

func sink(port string) error {
	l, err := net.Listen("tcp4", ":"+port)
	if err != nil {
		return err
	}
	fmt.Println("ready")
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(io.Discard, c)
		}()
	}
}

func blast(addr string, mib int) error {
	var c net.Conn
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err = net.DialTimeout("tcp4", addr, 2*time.Second); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	start := time.Now()
	for i := 0; i < mib*4; i++ {
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	if _, err := io.Copy(io.Discard, c); err != nil { // the sink closes once it has read everything
		return err
	}
	secs := time.Since(start).Seconds()
	fmt.Printf("gbit/s %.3f\n", float64(mib)*8*(1<<20)/secs/1e9)
	return nil
}
