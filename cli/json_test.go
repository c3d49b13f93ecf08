package cli

import (
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// TestMarshalJSONStable: -o json prints conventional JSON whatever spacing
// protojson chose (it randomises it per build): the same bytes as
// encoding/json's indenting, one space after each colon, none after commas.
func TestMarshalJSONStable(t *testing.T) {
	sb := &v1.Sandbox{Id: "sbx-1", State: "stopped", Labels: map[string]string{"team": "a"}, ExitCode: 3}
	for _, v := range []any{sb, []proto.Message{sb, sb}, map[string]int{"n": 1}} {
		b, err := marshalJSON(v)
		if err != nil {
			t.Fatal(err)
		}
		s := string(b)
		if strings.Contains(s, ":  ") || strings.Contains(s, ", ") || strings.Contains(s, "  ,") {
			t.Fatalf("unconventional spacing:\n%s", s)
		}
		if _, ok := v.(*v1.Sandbox); ok {
			want := "{\n  \"id\": \"sbx-1\",\n  \"state\": \"stopped\",\n  \"exit_code\": 3,\n  \"labels\": {\n    \"team\": \"a\"\n  }\n}"
			if s != want {
				t.Fatalf("got\n%s\nwant\n%s", s, want)
			}
		}
	}
}
