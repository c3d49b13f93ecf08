package imagebuild

import "testing"

// TestIDShift: only ids in the build's range are shifted back.
func TestIDShift(t *testing.T) {
	s := idShift{base: 1 << 20, size: 65536}
	for in, want := range map[uint32]int{1 << 20: 0, 1<<20 + 1000: 1000, 1<<20 + 65535: 65535, 1<<20 + 65536: 1<<20 + 65536, 0: 0, 1<<20 - 1: 1<<20 - 1} {
		if got := s.id(in); got != want {
			t.Errorf("shift %d: %d, want %d", in, got, want)
		}
	}
	if got := (idShift{}).id(1 << 20); got != 1<<20 {
		t.Errorf("zero shift changed an id: %d", got)
	}
}
