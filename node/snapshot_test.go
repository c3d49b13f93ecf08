package node

import (
	"context"
	"errors"
	"testing"
)

// fakeFreezer records freezes and thaws; failPause makes Pause fail.
type fakeFreezer struct {
	paused    bool
	failPause bool
	calls     []string
}

func (f *fakeFreezer) Paused(context.Context, string) bool { return f.paused }
func (f *fakeFreezer) Pause(context.Context, string) error {
	f.calls = append(f.calls, "pause")
	if f.failPause {
		return errors.New("freezer broken")
	}
	f.paused = true
	return nil
}
func (f *fakeFreezer) Resume(context.Context, string) error {
	f.calls = append(f.calls, "resume")
	f.paused = false
	return nil
}

// TestWhileFrozen: the sandbox is frozen while fn runs and thawed after,
// also when fn fails, panics or ctx is cancelled; a paused sandbox stays
// paused; if the freeze fails, fn does not run.
func TestWhileFrozen(t *testing.T) {
	boom := errors.New("walk failed")
	for _, tc := range []struct {
		name      string
		paused    bool
		failPause bool
		fnErr     error
		panics    bool
		cancel    bool
		wantCalls string
		wantRan   bool
		wantAfter bool // paused afterwards
	}{
		{name: "ok", wantCalls: "pause,resume", wantRan: true},
		{name: "fn error", fnErr: boom, wantCalls: "pause,resume", wantRan: true},
		{name: "fn panics", panics: true, wantCalls: "pause,resume", wantRan: true},
		{name: "cancelled ctx", cancel: true, wantCalls: "pause,resume", wantRan: true},
		{name: "already paused", paused: true, wantCalls: "", wantRan: true, wantAfter: true},
		{name: "freeze fails", failPause: true, wantCalls: "pause", wantRan: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeFreezer{paused: tc.paused, failPause: tc.failPause}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			ran, frozenDuring := false, false
			var err error
			func() {
				defer func() { _ = recover() }()
				err = whileFrozen(ctx, f, "sb-1", func() error {
					ran, frozenDuring = true, f.paused
					if tc.cancel {
						cancel()
					}
					if tc.panics {
						panic("walk panicked")
					}
					return tc.fnErr
				})
			}()
			if ran != tc.wantRan || (ran && !frozenDuring) {
				t.Errorf("fn ran %v (frozen %v), want ran %v while frozen", ran, frozenDuring, tc.wantRan)
			}
			got := ""
			for i, c := range f.calls {
				if i > 0 {
					got += ","
				}
				got += c
			}
			if got != tc.wantCalls || f.paused != tc.wantAfter {
				t.Errorf("calls %q, paused after %v; want %q, %v", got, f.paused, tc.wantCalls, tc.wantAfter)
			}
			if tc.fnErr != nil && !errors.Is(err, tc.fnErr) {
				t.Errorf("err %v, want %v", err, tc.fnErr)
			}
			if tc.failPause && err == nil {
				t.Error("a failed freeze returned no error")
			}
		})
	}
}
