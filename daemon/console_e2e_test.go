package daemon_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/browser"
	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/emulation"
	"github.com/chromedp/cdproto/input"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// chromium is Debian's browser (scripts/deps.sh installs it), driven headless.
const chromium = "/usr/bin/chromium"

// unixProxy forwards TCP connections on 127.0.0.1 (in the test's network
// namespace, where the browser runs) to the node's API socket, so that the
// browser talks to the node under test and nothing else. Its cleanup closes
// the connections still open.
func unixProxy(t *testing.T, socket string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]bool{}
	)
	track := func(c net.Conn, open bool) {
		mu.Lock()
		defer mu.Unlock()
		if open {
			conns[c] = true
		} else {
			delete(conns, c)
		}
	}
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				u, err := net.Dial("unix", socket)
				if err != nil {
					return
				}
				defer u.Close()
				track(c, true)
				track(u, true)
				defer track(c, false)
				defer track(u, false)
				done := make(chan struct{}, 2)
				go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
				go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
				<-done
			}()
		}
	}()
	return "http://" + l.Addr().String()
}

// artefacts is where the test's screenshots go: $CHALK_ARTIFACTS/<test>
// (kept), or else a temporary directory named in the log, kept only when
// the test fails.
func artefacts(t *testing.T) string {
	if a := os.Getenv("CHALK_ARTIFACTS"); a != "" {
		dir := filepath.Join(a, t.Name())
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshots in %s", dir)
		return dir
	}
	dir, err := os.MkdirTemp("", "chalk-"+t.Name()+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("screenshots kept in %s", dir)
			return
		}
		_ = os.RemoveAll(dir)
	})
	return dir
}

// startBrowser starts headless Chromium. Its requests can reach nothing but the
// test's proxy: every host name resolves to nothing, background networking
// is off (chromedp's defaults). It accepts confirm() dialogs and logs the
// page's console (CSP violations show there).
func startBrowser(t *testing.T, ctx context.Context) context.Context {
	t.Helper()
	if _, err := os.Stat(chromium); err != nil {
		t.Fatalf("needs %s (Debian package chromium; scripts/deps.sh installs it): %v", chromium, err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
		chromedp.NoSandbox, // runs as root
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 1000),
		chromedp.Flag("host-resolver-rules", "MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"),
		chromedp.Flag("no-proxy-server", true),
	)
	actx, cancelA := chromedp.NewExecAllocator(ctx, opts...)
	bctx, cancelB := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	var mu sync.Mutex
	done := false
	logf := func(format string, a ...any) {
		mu.Lock()
		defer mu.Unlock()
		if !done {
			t.Logf(format, a...)
		}
	}
	t.Cleanup(func() {
		mu.Lock()
		done = true
		mu.Unlock()
		cancelB()
		cancelA()
	})
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	dialogs := chromedp.Events(bctx, page.JavascriptDialogOpening)
	go func() {
		for ev, err := range dialogs {
			if err != nil {
				return
			}
			logf("browser dialog: %s (accepted)", ev.Message)
			go func() {
				_, _ = chromedp.Call(bctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: true})
			}()
		}
	}()
	messages := chromedp.Console(bctx)
	go func() {
		for m, err := range messages {
			if err != nil {
				return
			}
			logf("browser console: %s", m)
		}
	}()
	return bctx
}

// TestConsoleEndToEnd drives the web console in headless Chromium against a
// real node: a wrong key is refused with a message and no cookie; the org
// admin signs in with the keyboard alone and sees a sandbox made with the
// SDK (state, image, creator); creates one from the page; sees the first
// one's log, uploads a file into it (read back with the SDK) and downloads
// one the SDK wrote; types `echo hi` in its terminal and sees `hi` (on a
// node with terminals, `stty size` follows the window), then `exit 3` and
// sees the shell's exit; terminates it and watches its state become
// stopped; a policy edit with a bad hostname shows the API's validation
// error and changes nothing. The other pages (node metrics, images,
// tunnels, MCP servers and audit, the org's audit trail with the console's
// terminate in it) load, and every form control of the sandbox and policies
// pages has a label. Screenshots of each step go to
// $CHALK_ARTIFACTS/TestConsoleEndToEnd (kept in a temporary directory on
// failure otherwise).
func TestConsoleEndToEnd(t *testing.T) {
	n := chalktest.Start(t)
	ctx := ctxT(t, 4*time.Minute)
	org, err := n.Client().CreateOrg(ctx, "acme", "ann")
	if err != nil {
		t.Fatal(err)
	}
	key := org.AdminKey.Secret
	ann, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(key))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ann.CreatePolicy(ctx, chalkcompute.NetworkPolicy{Name: "web", AllowAll: chalkcompute.Bool(false), AllowedHostnames: []string{"example.com"}}); err != nil {
		t.Fatal(err)
	}
	sb, err := ann.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sh", "-c", "echo console-log-line; exec sleep 3600"))
	if err != nil {
		t.Fatal(err)
	}
	base := unixProxy(t, n.Socket)
	c := &consoleBrowser{t: t, n: n, base: base, dir: artefacts(t), b: startBrowser(t, ctx)}
	row := fmt.Sprintf(`#sandboxes tr[data-id=%q]`, sb.ID())

	c.signIn(key, row)
	c.sandboxFiles(ctx, sb, row)
	c.terminal()
	c.step("05-terminated",
		chromedp.Click(chromedp.ID("terminate")),
		until(`document.querySelector('#detail-state').textContent === 'stopped'`),
		chromedp.Evaluate[chromedp.Void](`location.hash = '#/sandboxes'`),
		until(fmt.Sprintf(`document.querySelector('%s td.state').textContent === 'stopped'`, row)),
	)
	c.policyError()
	if p, err := ann.GetPolicy(ctx, "web"); err != nil || strings.Join(p.AllowedHostnames, ",") != "example.com" {
		t.Fatalf("the refused edit changed the policy: %+v %v", p, err)
	}
	c.otherPages()
}

// consoleBrowser is a browser on a node's console, with the test's steps.
type consoleBrowser struct {
	t    *testing.T
	n    *chalktest.Node
	b    context.Context // the browser's tab
	dir  string          // screenshots
	base string          // the console's origin
}

// step runs actions (a minute at most) and saves a screenshot named name.
func (c *consoleBrowser) step(name string, actions ...chromedp.Action[chromedp.Void]) {
	c.t.Helper()
	sctx, cancel := context.WithTimeout(c.b, time.Minute)
	defer cancel()
	start := time.Now()
	err := chromedp.Do(sctx, actions...)
	c.t.Logf("step %s: %v", name, time.Since(start).Round(time.Millisecond))
	if png, serr := chromedp.Run(c.b, chromedp.FullScreenshot(100)); serr == nil {
		_ = os.WriteFile(filepath.Join(c.dir, name+".png"), png, 0o644)
	}
	if err != nil {
		page, _ := chromedp.Run(c.b, chromedp.Text(chromedp.CSS("main")))
		c.t.Fatalf("%s: %v\npage text: %s\nchalkd log:\n%s", name, err, page, tail(c.n.Log(), 3000))
	}
}

// until polls a JavaScript expression in the page until it is true (an
// exception, such as an element not there yet, counts as false).
func until(expr string) chromedp.Action[chromedp.Void] {
	return chromedp.Poll[chromedp.Void](fmt.Sprintf(`(() => { try { return !!(%s); } catch (e) { return false; } })()`, expr),
		chromedp.WithPollingTimeout(45*time.Second))
}

func (c *consoleBrowser) text(sel string) string {
	c.t.Helper()
	s, err := chromedp.Run(c.b, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		c.t.Fatalf("text of %s: %v", sel, err)
	}
	return s
}

func (c *consoleBrowser) cookies() []*network.Cookie {
	c.t.Helper()
	r, err := chromedp.Call(c.b, network.GetCookies, network.GetCookiesParams{})
	if err != nil {
		c.t.Fatal(err)
	}
	return r.Cookies
}

// labelled fails the test if a form control of the page has no label.
func (c *consoleBrowser) labelled(page string) {
	c.t.Helper()
	if u, err := chromedp.Run(c.b, chromedp.Evaluate[string](unlabelledJS)); err != nil || u != "" {
		c.t.Fatalf("controls without a label on the %s page: %q %v", page, u, err)
	}
}

// signIn: a wrong key is refused with a message and no cookie; the right
// one, typed with the keyboard alone, opens the live list with the SDK's
// sandbox; a sandbox created from the page opens its page, running, and
// terminates from there.
func (c *consoleBrowser) signIn(key, row string) {
	t := c.t
	c.step("01-wrong-key",
		chromedp.Navigate(c.base+"/console/"),
		chromedp.WaitVisible(chromedp.ID("apikey")),
		chromedp.SendKeys(chromedp.ID("apikey"), "chalk_thisisnotakey"),
		chromedp.Click(chromedp.CSS("#signin-form button[type=submit]")),
		until(`document.querySelector('#signin-error').textContent.includes('Sign-in failed: invalid API token')`),
	)
	if ck := c.cookies(); len(ck) != 0 {
		t.Fatalf("a wrong key got cookies: %v", ck)
	}
	// The key field has the focus after the error; Enter submits.
	c.step("02-sandboxes",
		until(`document.activeElement === document.querySelector('#apikey')`),
		typeKeys(key+"\r"),
		chromedp.WaitVisible(chromedp.CSS(row)),
		until(fmt.Sprintf(`document.querySelector('%s td.state').textContent === 'running'`, row)),
	)
	if image, creator := c.text(row+" td:nth-child(3)"), c.text(row+" td:nth-child(6)"); !strings.Contains(image, "busybox") || !strings.Contains(creator, "ann") {
		t.Fatalf("sandbox row: image %q, created by %q", image, creator)
	}
	if ck := c.cookies(); len(ck) != 1 || !ck[0].HTTPOnly || ck[0].SameSite != network.CookieSameSiteStrict {
		t.Fatalf("session cookies: %+v", ck)
	}
	c.step("02-create",
		chromedp.Click(chromedp.CSS("#view details summary")),
		chromedp.SetValue(chromedp.ID("new-cmd"), "sleep 600"),
		chromedp.Click(chromedp.CSS(`#create-form button[type=submit]`)),
		until(`location.hash.startsWith('#/sandbox/sb-') && document.querySelector('#detail-state').textContent === 'running'`),
		chromedp.Click(chromedp.ID("terminate")),
		until(`document.querySelector('#detail-state').textContent === 'stopped'`),
		chromedp.Evaluate[chromedp.Void](`location.hash = '#/sandboxes'`),
		chromedp.WaitVisible(chromedp.CSS(row)),
	)
}

// sandboxFiles opens the sandbox's page: its log shows, a file uploaded
// into /tmp is there for the SDK, a file the SDK wrote downloads.
func (c *consoleBrowser) sandboxFiles(ctx context.Context, sb *chalkcompute.Sandbox, row string) {
	t := c.t
	upload := filepath.Join(t.TempDir(), "hello.txt")
	if err := os.WriteFile(upload, []byte("uploaded from the browser\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c.step("03-sandbox",
		chromedp.Click(chromedp.CSS(row+" a")),
		until(`document.querySelector('#log').textContent.includes('console-log-line')`),
		chromedp.SetValue(chromedp.ID("files-path"), "/tmp"),
		chromedp.SetUploadFiles(chromedp.ID("upload"), []string{upload}),
		until(`document.querySelector('#files-table caption').textContent === 'Files in /tmp' && document.querySelector('#files-table').textContent.includes('hello.txt')`),
	)
	if got, err := sb.ReadFile(ctx, "/tmp/hello.txt"); err != nil || string(got) != "uploaded from the browser\n" {
		t.Fatalf("uploaded file: %q %v", got, err)
	}
	downloads := t.TempDir()
	if err := sb.WriteFile(ctx, "/tmp/from-sdk.txt", []byte("written by the SDK\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.CallBrowser(c.b, browser.SetDownloadBehavior, browser.SetDownloadBehaviorParams{
		Behavior: browser.SetDownloadBehaviorBehaviorAllow, DownloadPath: downloads, EventsEnabled: new(true),
	}); err != nil {
		t.Fatal(err)
	}
	dctx, cancel := context.WithCancel(c.b)
	defer cancel()
	progress := chromedp.BrowserEvents(dctx, browser.DownloadProgress)
	c.step("03-download",
		chromedp.Click(chromedp.CSS(`#files form button[type=submit]`)),
		chromedp.WaitVisible(chromedp.CSS(`button[aria-label="Download from-sdk.txt"]`)),
		chromedp.Click(chromedp.CSS(`button[aria-label="Download from-sdk.txt"]`)),
	)
	for ev, err := range progress {
		if err != nil {
			t.Fatalf("download: %v", err)
		}
		if ev.State == browser.DownloadProgressStateCanceled {
			t.Fatal("download canceled")
		}
		if ev.State == browser.DownloadProgressStateCompleted {
			break
		}
	}
	if got, err := os.ReadFile(filepath.Join(downloads, "from-sdk.txt")); err != nil || string(got) != "written by the SDK\n" {
		t.Fatalf("downloaded file: %q %v", got, err)
	}
}

// terminal: `echo hi` shows a line `hi` (with a pty, or in line mode on a
// node without terminals); with a pty, `stty size` is the page's size and
// follows the window when it shrinks (ResizeExec); `exit 3` shows.
func (c *consoleBrowser) terminal() {
	c.step("04-terminal",
		until(`!document.querySelector('#open-terminal').disabled`),
		chromedp.Click(chromedp.ID("open-terminal")),
		until(`document.querySelector('#terminal-status').textContent.startsWith('Connected')`),
		chromedp.Focus(chromedp.CSS(".xterm-helper-textarea")),
		typeKeys("echo hi\r"),
		until(`Array.from(document.querySelectorAll('.xterm-rows > div')).some(r => r.textContent.trim() === 'hi')`),
	)
	c.labelled("sandbox")
	status := c.text("#terminal-status")
	c.t.Logf("terminal: %s", status)
	if status == "Connected." {
		sizeShown := `Array.from(document.querySelectorAll('.xterm-rows > div')).filter(r => r.textContent.trim() === document.querySelector('#terminal').dataset.size).length === 1`
		c.step("04-terminal-size",
			typeKeys("clear; stty size\r"),
			until(sizeShown),
			chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
				_, err := cdp.Call(ctx, t, emulation.SetDeviceMetricsOverride, emulation.SetDeviceMetricsOverrideParams{Width: 640, Height: 1000, DeviceScaleFactor: 1})
				return err
			}),
			until(`document.querySelector('#terminal').dataset.size.split(' ')[1] < 100`),
			typeKeys("clear; stty size\r"),
			until(sizeShown),
		)
	}
	c.step("04-terminal-exit",
		typeKeys("exit 3\r"),
		until(`document.querySelector('#terminal-status').textContent === 'The shell exited (3).'`),
	)
}

// policyError: an edit with a bad hostname shows the API's validation error.
func (c *consoleBrowser) policyError() {
	c.step("06-policy-error",
		chromedp.Evaluate[chromedp.Void](`location.hash = '#/policies'`),
		chromedp.WaitVisible(chromedp.CSS(`button[aria-label="Edit web"]`)),
		chromedp.Click(chromedp.CSS(`button[aria-label="Edit web"]`)),
		chromedp.SetValue(chromedp.ID("policy-hosts"), "example.com\nbad_host!.example"),
		chromedp.Click(chromedp.ID("policy-save")),
		until(`document.querySelector('#policy-error').textContent.includes('bad_host!.example')`),
	)
	if msg := c.text("#policy-error"); !strings.HasPrefix(msg, "Not saved: ") {
		c.t.Fatalf("policy error: %q", msg)
	}
	c.labelled("policies")
}

// otherPages load their lists (ann is her org's admin: the node page shows
// chalkd's metrics), and the org's audit trail has the console's
// terminate, as ann's.
func (c *consoleBrowser) otherPages() {
	c.step("07-node",
		chromedp.Evaluate[chromedp.Void](`location.hash = '#/node'`),
		until(`Array.from(document.querySelectorAll('#metrics td')).some(td => td.textContent.startsWith('chalk_sandbox_starts'))`),
	)
	for page, title := range map[string]string{"images": "Images", "tunnels": "Tunnels", "mcp": "MCP servers", "audit": "MCP gateway audit log", "org-audit": "Audit log"} {
		c.step("08-"+page,
			chromedp.Evaluate[chromedp.Void](fmt.Sprintf(`location.hash = '#/%s'`, page)),
			until(fmt.Sprintf(`document.querySelector('#view h1').textContent === %q && !!document.querySelector('#view table') && document.querySelector('#list-error').textContent === ''`, title)),
		)
	}
	c.step("09-audit-trail",
		chromedp.Evaluate[chromedp.Void](`location.hash = '#/org-audit'`),
		until(`Array.from(document.querySelectorAll('#view tr')).some(tr => tr.textContent.includes('SandboxService/Terminate') && tr.textContent.includes('ann') && tr.textContent.includes('ok'))`),
	)
}

// unlabelledJS names the page's form controls that have no label.
const unlabelledJS = `Array.from(document.querySelectorAll('input, textarea, select'))
	.filter(e => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
	.map(e => e.outerHTML).join(' ')`

// typeKeys types s into the focused element as a keyboard does: a key
// down (with its text) and up per character, Enter for "\r". (SendKeys
// also sends a separate char event, which xterm.js takes as a second
// keystroke.)
func typeKeys(s string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		for _, r := range s {
			down := input.DispatchKeyEventParams{Type: input.DispatchKeyEventTypeKeyDown, Key: string(r), Text: string(r)}
			if r == '\r' {
				down = input.DispatchKeyEventParams{Type: input.DispatchKeyEventTypeKeyDown, Key: "Enter", Code: "Enter", WindowsVirtualKeyCode: 13, Text: "\r"}
			}
			up := down
			up.Type, up.Text = input.DispatchKeyEventTypeKeyUp, ""
			for _, ev := range []input.DispatchKeyEventParams{down, up} {
				if _, err := cdp.Call(ctx, t, input.DispatchKeyEvent, ev); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
