package cli

import (
	"errors"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func TestQueryBody(t *testing.T) {
	b, err := queryBody([]string{"user.id=1", "user.name=ada", "user.tags=[\"a\"]", "user.note="}, []string{"user.score", "user.rank"})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"inputs":{"user.id":1,"user.name":"ada","user.note":"","user.tags":["a"]},"outputs":["user.score","user.rank"]}`
	if string(b) != want {
		t.Fatalf("body %s, want %s", b, want)
	}
	for _, tc := range []struct {
		in, out []string
		want    string
	}{
		{nil, []string{"a"}, "at least one --in"},
		{[]string{"a=1"}, nil, "at least one --in"},
		{[]string{"a"}, []string{"b"}, `--in "a": want feature=value`},
		{[]string{"=1"}, []string{"b"}, `--in "=1"`},
		{[]string{"a=1", "a=2"}, []string{"b"}, "given twice"},
		{[]string{"a=1"}, []string{"b=2"}, `--out "b=2"`},
		{[]string{"a=1"}, []string{""}, `--out ""`},
	} {
		if _, err := queryBody(tc.in, tc.out); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("queryBody(%q, %q) = %v, want an InvalidArgument with %q", tc.in, tc.out, err, tc.want)
		}
	}
}
