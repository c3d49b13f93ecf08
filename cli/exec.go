package cli

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

// Commands running programs in a sandbox: `sandbox exec` (streamed, -o json
// collected, -t/-it on a terminal) and `sandbox shell`.

func sbExec(e *env) *cobra.Command {
	var (
		interactive bool
		tty         bool
		workdir     string
		envs        []string
		timeout     time.Duration
		user        string
	)
	cmd := &cobra.Command{
		Use:   "exec ID -- COMMAND [ARGS...]",
		Short: "Run a command in a sandbox, streaming its output; exits with its exit code",
		Long: `Run a command in a sandbox, streaming its output; exits with its exit code.

With -t the command runs on a terminal allocated in the sandbox; with -it
this terminal is in raw mode and follows the window size, as with
"docker exec -it" (^C, ^Z and ^D reach the program).`,
		Args: cobra.MinimumNArgs(2),
		RunE: first(func() error {
			if tty && e.json() {
				return fmt.Errorf("-t and --output json do not mix: a terminal's output is not JSON")
			}
			if tty && interactive && !isTerminal(e.in) {
				return errNotATTY
			}
			return nil
		}, withSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox, args []string) error {
			opts, err := execOptions(envs, workdir, user)
			if err != nil {
				return err
			}
			if timeout > 0 {
				opts = append(opts, chalkcompute.ExecTimeout(timeout))
			}
			if tty {
				return runTerminal(ctx, e, sb, args[1:], interactive, opts)
			}
			if e.json() {
				// Collected, then printed as one document.
				res, err := sb.Exec(ctx, args[1:], opts...)
				if err != nil {
					return err
				}
				if err := e.printJSON(map[string]any{"stdout": string(res.Stdout), "stderr": string(res.Stderr),
					"exit_code": res.Code, "signal": res.Signal, "timed_out": res.TimedOut}); err != nil {
					return err
				}
				return exitCode(res.Code)
			}
			opts = append(opts, chalkcompute.Stdout(e.out), chalkcompute.Stderr(e.errOut))
			if interactive {
				opts = append(opts, chalkcompute.ExecStdin())
			}
			p, err := sb.Start(ctx, args[1:], opts...)
			if err != nil {
				return err
			}
			if interactive {
				go func() {
					_, _ = io.Copy(p.Stdin(), e.in)
					_ = p.Stdin().Close()
				}()
			}
			st, err := p.Wait()
			if err != nil {
				return err
			}
			if st.TimedOut {
				fmt.Fprintln(e.errOut, "chalk: command timed out")
			}
			return exitCode(st.Code)
		})),
	}
	f := cmd.Flags()
	f.BoolVarP(&interactive, "interactive", "i", false, "pass stdin to the command")
	f.BoolVarP(&tty, "tty", "t", false, "run the command on a terminal (with -i: raw mode, like docker exec -it)")
	f.StringVarP(&workdir, "workdir", "w", "", "working directory")
	f.StringArrayVarP(&envs, "env", "e", nil, "NAME=VALUE (repeatable)")
	f.DurationVar(&timeout, "timeout", 0, "kill the command after this long")
	f.StringVarP(&user, "user", "u", "", "uid[:gid]")
	return cmd
}

func sbShell(e *env) *cobra.Command {
	var (
		workdir string
		envs    []string
		user    string
	)
	cmd := &cobra.Command{
		Use:   "shell ID",
		Short: "Open an interactive shell in a sandbox (bash if it has one, else sh); exits with the shell's exit code",
		Args:  cobra.ExactArgs(1),
		RunE: first(func() error {
			if !isTerminal(e.in) {
				return errNotATTY
			}
			return nil
		}, withSandbox(e, func(ctx context.Context, sb *chalkcompute.Sandbox, _ []string) error {
			opts, err := execOptions(envs, workdir, user)
			if err != nil {
				return err
			}
			return runTerminal(ctx, e, sb, []string{"/bin/sh", "-c", shellScript}, true, opts)
		})),
	}
	f := cmd.Flags()
	f.StringVarP(&workdir, "workdir", "w", "", "working directory")
	f.StringArrayVarP(&envs, "env", "e", nil, "NAME=VALUE (repeatable)")
	f.StringVarP(&user, "user", "u", "", "uid[:gid]")
	return cmd
}

// execOptions are the options exec and shell share (-e, -w, -u).
func execOptions(envs []string, workdir, user string) ([]chalkcompute.ExecOption, error) {
	envm, err := parseEnv(envs)
	if err != nil {
		return nil, err
	}
	return []chalkcompute.ExecOption{chalkcompute.ExecEnv(envm), chalkcompute.ExecWorkdir(workdir), chalkcompute.ExecUser(user)}, nil
}

// exitCode is the error carrying a command's non-zero exit code out of chalk.
func exitCode(code int) error {
	if code != 0 {
		return &ExitError{Code: code}
	}
	return nil
}
