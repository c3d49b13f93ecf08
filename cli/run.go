package cli

import (
	"context"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// The shared bodies of commands. Every command that talks to chalkd is one
// of these:
//
//   - call: one API call, its result printed as JSON (stable; see
//     printJSON) under --output json, else as text; onSandbox is call on the
//     sandbox its first argument names;
//   - eachSandbox: the same call on each sandbox named (rm, pause, resume),
//     a text line per sandbox as it goes, one JSON array at the end;
//   - withClient / withSandbox: commands that stream (exec, logs, cp) or
//     show progress, and print with output themselves.
//
// Long operations take e.progressFn() (bars on a terminal, nothing under
// --output json).

// body is a command's RunE.
type body = func(*cobra.Command, []string) error

// call is the body of a command that makes one API call and prints its
// result: it gets the client, runs f with the command's context and
// arguments, then prints the result (output).
func call[T any](e *env, f func(ctx context.Context, c *chalkcompute.Client, args []string) (T, error), asJSON func(T) any, text func(T)) body {
	return callWith(e, e.client, f, asJSON, text)
}

// callWith is call with the client from client (adminClient for org
// management).
func callWith[T any](e *env, client func() (*chalkcompute.Client, error), f func(ctx context.Context, c *chalkcompute.Client, args []string) (T, error), asJSON func(T) any, text func(T)) body {
	return withClientOf(client, func(ctx context.Context, c *chalkcompute.Client, args []string) error {
		v, err := f(ctx, c, args)
		if err != nil {
			return err
		}
		return output(e, v, asJSON, text)
	})
}

// onSandbox is call for a command whose first argument is a sandbox id.
func onSandbox[T any](e *env, f func(ctx context.Context, sb *chalkcompute.Sandbox, args []string) (T, error), asJSON func(T) any, text func(T)) body {
	return call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (T, error) {
		sb, err := c.Sandbox(ctx, args[0])
		if err != nil {
			var zero T
			return zero, err
		}
		return f(ctx, sb, args)
	}, asJSON, text)
}

// eachSandbox runs f on each sandbox its arguments name, in order, and
// stops at the first error: text prints a line per sandbox as it goes;
// under --output json the results are printed as one array at the end.
func eachSandbox(e *env, f func(ctx context.Context, sb *chalkcompute.Sandbox) (*v1.Sandbox, error), text func(id string, info *v1.Sandbox)) body {
	return withClient(e, func(ctx context.Context, c *chalkcompute.Client, args []string) error {
		var out []proto.Message
		for _, id := range args {
			sb, err := c.Sandbox(ctx, id)
			if err != nil {
				return err
			}
			info, err := f(ctx, sb)
			if err != nil {
				return err
			}
			out = append(out, info)
			if !e.json() {
				text(id, info)
			}
		}
		if e.json() {
			return e.printJSON(out)
		}
		return nil
	})
}

// withClient is the body of a command that does more than one call and
// print (streams, progress, loops): it gets the client and runs f.
func withClient(e *env, f func(ctx context.Context, c *chalkcompute.Client, args []string) error) body {
	return withClientOf(e.client, f)
}

// withSandbox is withClient on the sandbox the first argument names.
func withSandbox(e *env, f func(ctx context.Context, sb *chalkcompute.Sandbox, args []string) error) body {
	return withClient(e, func(ctx context.Context, c *chalkcompute.Client, args []string) error {
		sb, err := c.Sandbox(ctx, args[0])
		if err != nil {
			return err
		}
		return f(ctx, sb, args)
	})
}

func withClientOf(client func() (*chalkcompute.Client, error), f func(ctx context.Context, c *chalkcompute.Client, args []string) error) body {
	return func(cmd *cobra.Command, args []string) error {
		c, err := client()
		if err != nil {
			return err
		}
		return f(cmd.Context(), c, args)
	}
}

// output prints v as JSON (asJSON's value) under --output json, else with
// text (nil: nothing).
func output[T any](e *env, v T, asJSON func(T) any, text func(T)) error {
	if e.json() {
		return e.printJSON(asJSON(v))
	}
	if text != nil {
		text(v)
	}
	return nil
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

// first runs check (flags, the terminal: what needs no server) before b.
func first(check func() error, b body) body {
	return func(cmd *cobra.Command, args []string) error {
		if err := check(); err != nil {
			return err
		}
		return b(cmd, args)
	}
}
