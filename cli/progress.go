package cli

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// progress draws pull/warm/build progress: a bar per layer on a terminal, plain
// lines otherwise. Build log lines are printed as they arrive.
type progress struct {
	mu     sync.Mutex
	w      io.Writer
	tty    bool
	last   string
	layers map[string][2]int64
}

func newProgress(w io.Writer) *progress {
	tty := false
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	return &progress{w: w, tty: tty, layers: map[string][2]int64{}}
}

func short(s string) string {
	s = strings.TrimPrefix(s, "sha256:")
	if len(s) > 12 {
		return s[:12]
	}
	return s
}

func bar(cur, total int64) string {
	const width = 30
	if total <= 0 {
		return strings.Repeat("-", width)
	}
	n := int(cur * width / total)
	n = min(max(n, 0), width)
	return strings.Repeat("=", n) + strings.Repeat(" ", width-n)
}

func (p *progress) update(m *v1.ImageProgress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case m.Line != "":
		p.clear()
		fmt.Fprintf(p.w, "#%d %s\n", m.Step, strings.TrimRight(m.Line, "\n"))
	case m.Phase == "build" && m.Cached:
		p.clear()
		fmt.Fprintf(p.w, "#%d CACHED\n", m.Step)
	case m.Phase == "pull" || m.Phase == "extract" || m.Phase == "push":
		amount := human(m.Current) + "/" + human(m.Total)
		if m.Phase == "extract" {
			amount = "" // extraction reports layers, not bytes
		}
		line := fmt.Sprintf("%s%-8s %s [%s] %s", nodePrefix(m), m.Phase, short(m.Layer), bar(m.Current, m.Total), amount)
		if p.tty {
			fmt.Fprintf(p.w, "\r%-90s", line)
			p.last = line
		} else if m.Current == m.Total || m.Current == 0 {
			fmt.Fprintln(p.w, line)
		}
	case m.Phase == "prestart":
		line := fmt.Sprintf("%-8s %s [%s] %d/%d sandboxes", m.Phase, short(m.Layer), bar(m.Current, m.Total), m.Current, m.Total)
		if m.Total == 0 {
			line = fmt.Sprintf("%-8s %s: no sandboxes kept pre-started", m.Phase, short(m.Layer))
		}
		if p.tty {
			fmt.Fprintf(p.w, "\r%-90s", line)
			p.last = line
		} else {
			fmt.Fprintln(p.w, line)
		}
	case m.Phase == "done":
		p.clear()
		if m.Image != nil {
			warm := ""
			if m.BytesPulled == 0 {
				warm = " (warm)"
			}
			fmt.Fprintf(p.w, "ready %s %s, pulled %s%s\n", m.Image.Ref, short(m.Image.Digest), human(m.BytesPulled), warm)
		}
	case m.Phase == "resolve" && m.Layer == "":
	case m.Phase != "":
		p.clear()
		fmt.Fprintf(p.w, "%s%s %s\n", nodePrefix(m), m.Phase, m.Layer)
	}
}

// nodePrefix names the fleet node a progress message is about.
func nodePrefix(m *v1.ImageProgress) string {
	if m.Node == "" {
		return ""
	}
	return m.Node + ": "
}

func (p *progress) clear() {
	if p.tty && p.last != "" {
		fmt.Fprintln(p.w)
		p.last = ""
	}
}

func human(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
