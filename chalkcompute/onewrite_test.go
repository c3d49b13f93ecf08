package chalkcompute

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// countingConn counts the writes made to a connection.
type countingConn struct {
	net.Conn
	mu     *sync.Mutex
	writes *int
}

func (c countingConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	*c.writes++
	c.mu.Unlock()
	return c.Conn.Write(b)
}

// onlyReader hides every method of its reader but Read (as Connect's
// request bodies look to net/http: not known to be in memory).
type onlyReader struct{ io.Reader }

// TestOneWrite: a request with a small body of known length leaves in one
// write through oneWrite, where net/http alone writes its header and its
// body apart; the server gets the whole body either way.
func TestOneWrite(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					b, _ := io.ReadAll(req.Body)
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: "+strconv.Itoa(len(b))+"\r\n\r\n"+string(b))
				}
			}()
		}
	}()
	for _, tc := range []struct {
		name   string
		wrap   bool
		writes int
	}{{"net/http", false, 2}, {"oneWrite", true, 1}} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			writes := 0
			tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var d net.Dialer
				c, err := d.DialContext(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return countingConn{c, &mu, &writes}, nil
			}}
			defer tr.CloseIdleConnections()
			var rt http.RoundTripper = tr
			if tc.wrap {
				rt = oneWrite{tr}
			}
			body := "\x00\x00\x00\x00\x05hello"
			req, err := http.NewRequest("POST", "http://"+l.Addr().String()+"/x", onlyReader{strings.NewReader(body)})
			if err != nil {
				t.Fatal(err)
			}
			req.ContentLength = int64(len(body))
			resp, err := (&http.Client{Transport: rt}).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(got) != body {
				t.Fatalf("the server got %q, want %q", got, body)
			}
			mu.Lock()
			defer mu.Unlock()
			if writes != tc.writes {
				t.Fatalf("%d writes, want %d", writes, tc.writes)
			}
		})
	}
}
