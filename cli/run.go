package cli

import (
	"context"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

// call is the body of a command that makes one API call and prints its
// result: it gets the client, runs f with the command's context and
// arguments, then prints the result as JSON (asJSON's value, stable; see
// printJSON) under --output json, else as text. Commands that do more
// (stream, prompt, loop) write their own RunE.
func call[T any](e *env, f func(ctx context.Context, c *chalkcompute.Client, args []string) (T, error), asJSON func(T) any, text func(T)) func(*cobra.Command, []string) error {
	return callWith(e, e.client, f, asJSON, text)
}

// callWith is call with the client from client (adminClient for org
// management).
func callWith[T any](e *env, client func() (*chalkcompute.Client, error), f func(ctx context.Context, c *chalkcompute.Client, args []string) (T, error), asJSON func(T) any, text func(T)) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		c, err := client()
		if err != nil {
			return err
		}
		v, err := f(cmd.Context(), c, args)
		if err != nil {
			return err
		}
		if e.json() {
			return e.printJSON(asJSON(v))
		}
		text(v)
		return nil
	}
}

// deleted and removed are the JSON of a command that removed name.
func deleted(name string) any { return map[string]string{"deleted": name} }
func removed(name string) any { return map[string]string{"removed": name} }

// asIs is the JSON of a result printed as it is.
func asIs[T any](v T) any { return v }

// messages is the JSON of a list of API messages (printed as one array).
func messages[M proto.Message](xs []M) any {
	ms := make([]proto.Message, 0, len(xs))
	for _, x := range xs {
		ms = append(ms, x)
	}
	return ms
}
