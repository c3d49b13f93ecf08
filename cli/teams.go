package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// Teams commands: `chalk admin org|member|audit` and `chalk auth login|keys`.

// adminClient is the client for admin commands naming an org with --org:
// the org's own key when the config has one, else the current key (the
// node admin acting on another org; the request names the org).
func (e *env) adminClient() (*chalkcompute.Client, error) {
	if e.org != "" {
		if fc, err := chalkcompute.ReadConfig(); err == nil && e.token == "" && os.Getenv("CHALK_API_TOKEN") == "" {
			if _, ok := fc.Keys[e.org]; !ok {
				saved := e.org
				e.org = ""
				defer func() { e.org = saved }()
			}
		}
	}
	return e.client()
}

func orgCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "org", Aliases: []string{"orgs"}, Short: "Organisations (create: node admin)"}
	var admin string
	create := &cobra.Command{
		Use:   "create NAME --admin USER",
		Short: "Create an org and its first admin; prints the admin's key (shown once)",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (*v1.CreateOrgResponse, error) {
			return c.CreateOrg(ctx, args[0], admin)
		}, asIs, func(res *v1.CreateOrgResponse) {
			fmt.Fprintf(e.out, "created org %s with admin %s\nkey (shown once; 'chalk auth login --key ...' stores it):\n%s\n", res.Org.Name, admin, res.AdminKey.Secret)
		}),
	}
	create.Flags().StringVar(&admin, "admin", "", "the org's first admin (a new or existing user)")
	_ = create.MarkFlagRequired("admin")
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List orgs (every org for the node admin, else yours) with their quotas",
		Args:  cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]*v1.Org, error) {
			return c.Orgs(ctx)
		}, messages[*v1.Org], func(orgs []*v1.Org) {
			rows := make([][]string, 0, len(orgs))
			for _, o := range orgs {
				rows = append(rows, append([]string{o.Name, o.CreatedAt}, quotaCells(o.Quota)...))
			}
			e.table("NAME\tCREATED\tMAX SANDBOXES\tMAX VCPU\tMAX MEMORY MB\tMAX CREATES/MIN\tMAX UPLOAD BYTES", rows)
		}),
	}
	cmd.AddCommand(create, ls, quotaCmd(e))
	return cmd
}

func limit(v any) string {
	if s := fmt.Sprint(v); s == "0" || s == "-1" {
		return "-"
	}
	return fmt.Sprint(v)
}

func quotaCells(q *v1.Quota) []string {
	return []string{limit(q.GetMaxRunningSandboxes()), limit(q.GetMaxVcpu()), limit(q.GetMaxMemoryMb()), limit(q.GetMaxCreatesPerMinute()), limit(q.GetMaxUploadBytes())}
}

func quotaCmd(e *env) *cobra.Command {
	q := &v1.Quota{}
	cmd := &cobra.Command{
		Use:   "quota [ORG] [--max-sandboxes N] [--max-vcpu N] [--max-memory-mb N] [--max-creates-per-minute N] [--max-upload-bytes N]",
		Short: "Show an org's quota, or set it (node admin; 0 = the node's default)",
		Args:  cobra.MaximumNArgs(1),
	}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		set := false
		for _, f := range []string{"max-sandboxes", "max-vcpu", "max-memory-mb", "max-creates-per-minute", "max-upload-bytes"} {
			set = set || cmd.Flags().Changed(f)
		}
		return call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (*v1.Quota, error) {
			org := ""
			if len(args) == 1 {
				org = args[0]
			}
			if set {
				return c.SetQuota(ctx, org, q)
			}
			return c.Quota(ctx, org)
		}, asIs, func(res *v1.Quota) {
			e.table("MAX SANDBOXES\tMAX VCPU\tMAX MEMORY MB\tMAX CREATES/MIN\tMAX UPLOAD BYTES\tUPLOAD BYTES",
				[][]string{append(quotaCells(res), fmt.Sprint(res.GetUploadBytes()))})
		})(cmd, args)
	}
	f := cmd.Flags()
	f.Int32Var(&q.MaxRunningSandboxes, "max-sandboxes", 0, "running sandboxes")
	f.Float64Var(&q.MaxVcpu, "max-vcpu", 0, "total vCPU of running sandboxes")
	f.Int64Var(&q.MaxMemoryMb, "max-memory-mb", 0, "total memory of running sandboxes (MiB)")
	f.Int32Var(&q.MaxCreatesPerMinute, "max-creates-per-minute", 0, "sandbox creates per minute")
	f.Int64Var(&q.MaxUploadBytes, "max-upload-bytes", 0, "bytes of uploaded content the org keeps (-1: no limit)")
	return cmd
}

func memberCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "member", Aliases: []string{"members"}, Short: "Members of your org (or --org, node admin) and their roles"}
	var role, user string
	add := &cobra.Command{
		Use:   "add USER --role admin|member|viewer",
		Short: "Add a user (new or existing) to the org; prints the user's first key (shown once)",
		Args:  cobra.ExactArgs(1),
		RunE: callWith(e, e.adminClient, func(ctx context.Context, c *chalkcompute.Client, args []string) (*v1.AddMemberResponse, error) {
			user = args[0] // printed as given
			return c.AddMember(ctx, e.org, args[0], role)
		}, asIs, func(res *v1.AddMemberResponse) {
			fmt.Fprintf(e.out, "added %s as %s to org %s\nkey (shown once; 'chalk auth login --key ...' stores it):\n%s\n", user, res.Member.Role, res.Key.Org, res.Key.Secret)
		}),
	}
	add.Flags().StringVar(&role, "role", "member", "admin, member or viewer")
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List the org's members",
		Args:  cobra.NoArgs,
		RunE: callWith(e, e.adminClient, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]*v1.Member, error) {
			return c.Members(ctx, e.org)
		}, messages[*v1.Member], func(ms []*v1.Member) {
			rows := make([][]string, 0, len(ms))
			for _, m := range ms {
				rows = append(rows, []string{m.User, m.Role, m.CreatedAt})
			}
			e.table("USER\tROLE\tADDED", rows)
		}),
	}
	rm := &cobra.Command{
		Use:   "rm USER",
		Short: "Remove a user from the org (revokes its keys there; not the last admin)",
		Args:  cobra.ExactArgs(1),
		RunE: callWith(e, e.adminClient, func(ctx context.Context, c *chalkcompute.Client, args []string) (string, error) {
			return args[0], c.RemoveMember(ctx, e.org, args[0])
		}, removed, func(user string) { fmt.Fprintln(e.out, "removed", user) }),
	}
	setRole := &cobra.Command{
		Use:   "set-role USER admin|member|viewer",
		Short: "Change a member's role (its keys follow at once; not the last admin's)",
		Args:  cobra.ExactArgs(2),
		RunE: callWith(e, e.adminClient, func(ctx context.Context, c *chalkcompute.Client, args []string) (*v1.Member, error) {
			return c.SetMemberRole(ctx, e.org, args[0], args[1])
		}, asIs, func(m *v1.Member) { fmt.Fprintf(e.out, "%s is now %s\n", m.User, m.Role) }),
	}
	cmd.AddCommand(add, ls, rm, setRole)
	return cmd
}

func auditCmd(e *env) *cobra.Command {
	q := &v1.AuditRequest{}
	var since time.Duration
	cmd := &cobra.Command{
		Use:   "audit [--since 1h] [--action SandboxService/Create] [--limit N]",
		Short: "Show your org's audit trail, newest first (admin)",
		Args:  cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]*v1.AuditRecord, error) {
			if since > 0 {
				q.Since = time.Now().Add(-since).UTC().Format(time.RFC3339)
			}
			return c.Audit(ctx, q)
		}, messages[*v1.AuditRecord], func(recs []*v1.AuditRecord) {
			rows := make([][]string, 0, len(recs))
			for _, r := range recs {
				rows = append(rows, []string{r.At, r.Actor, r.Via, r.Action, r.Object, r.Outcome})
			}
			e.table("TIME\tACTOR\tVIA\tACTION\tOBJECT\tOUTCOME", rows)
		}),
	}
	f := cmd.Flags()
	f.DurationVar(&since, "since", 0, "only records this recent")
	f.StringVar(&q.Action, "action", "", "only this action (Service/Method)")
	f.Int32Var(&q.Limit, "limit", 100, "at most this many records")
	return cmd
}

func authCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "auth", Short: "Log in with an API key, and manage your keys"}
	cmd.AddCommand(loginCmd(e), keysCmd(e))
	return cmd
}

func loginCmd(e *env) *cobra.Command {
	var key string
	cmd := &cobra.Command{
		Use:   "login --key KEY [--api-url URL]",
		Short: "Store an API key in the config file (as the key of its org, and the current one)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if key == "" || key == "-" {
				b, err := readAllLimited(e.in, 4096)
				if err != nil {
					return err
				}
				key = strings.TrimSpace(string(b))
			}
			fc, err := chalkcompute.ReadConfig()
			if err != nil {
				return err
			}
			url := e.url
			if url == "" {
				url = os.Getenv("CHALK_API_URL")
			}
			if url == "" {
				url = fc.APIURL
			}
			c, err := chalkcompute.NewClient(chalkcompute.WithURL(url), chalkcompute.WithToken(key))
			if err != nil {
				return err
			}
			w, err := c.WhoAmI(cmd.Context())
			if err != nil {
				return fmt.Errorf("the key does not work: %w", err)
			}
			if w.Kind != "user" {
				return fmt.Errorf("that is a %s token, not a user's API key", w.Kind)
			}
			if fc.Keys == nil {
				fc.Keys = map[string]string{}
			}
			if fc.Token != "" && fc.Org == "" {
				// A config from before teams: keep its key under its org.
				if old, err := chalkcompute.NewClient(chalkcompute.WithURL(url), chalkcompute.WithToken(fc.Token)); err == nil {
					if ow, err := old.WhoAmI(cmd.Context()); err == nil && ow.OrgId != w.OrgId {
						fc.Keys[ow.OrgId] = fc.Token
					}
				}
			}
			fc.APIURL, fc.Token, fc.Org = url, key, w.OrgId
			fc.Keys[w.OrgId] = key
			if err := chalkcompute.WriteConfig(fc); err != nil {
				return err
			}
			return output(e, w, asIs, func(w *v1.WhoAmIResponse) {
				fmt.Fprintf(e.out, "logged in as %s in org %s (%s) with key %s; saved to %s\n", w.User, w.OrgId, w.Role, w.KeyPrefix, chalkcompute.ConfigPath())
			})
		},
	}
	cmd.Flags().StringVar(&key, "key", "", "the API key (default: read from stdin)")
	return cmd
}

func keysCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "keys", Aliases: []string{"key"}, Short: "API keys (per user per org; shown once at creation)"}
	var (
		role, user string
		ttl        time.Duration
		all        bool
	)
	create := &cobra.Command{
		Use:   "create NAME [--role viewer|member|admin] [--ttl 720h] [--user USER]",
		Short: "Create an API key and print it (shown once)",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (*v1.ApiKey, error) {
			opts := []chalkcompute.KeyOption{chalkcompute.KeyRole(role), chalkcompute.KeyTTL(ttl)}
			if user != "" {
				opts = append(opts, chalkcompute.KeyFor(user))
			}
			return c.CreateKey(ctx, args[0], opts...)
		}, asIs, func(k *v1.ApiKey) {
			fmt.Fprintf(e.out, "key %s (%s, role %s, org %s) — shown once:\n%s\n", k.Name, k.Prefix, k.Role, k.Org, k.Secret)
		}),
	}
	cf := create.Flags()
	cf.StringVar(&role, "role", "", "the key's role, at most yours (default: yours)")
	cf.DurationVar(&ttl, "ttl", 0, "expire after this long (default: never)")
	cf.StringVar(&user, "user", "", "make the key for another member (admins)")
	ls := &cobra.Command{
		Use:   "ls [--all]",
		Short: "List your keys (--all: every member's, admins)",
		Args:  cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]*v1.ApiKey, error) {
			return c.Keys(ctx, all)
		}, messages[*v1.ApiKey], func(keys []*v1.ApiKey) {
			rows := make([][]string, 0, len(keys))
			for _, k := range keys {
				state := "active"
				if k.RevokedAt != "" {
					state = "revoked"
				}
				rows = append(rows, []string{k.Id, k.Prefix, k.Name, k.User, k.Role, k.CreatedBy, k.CreatedAt, dash(k.LastUsedAt), dash(k.ExpiresAt), state})
			}
			e.table("ID\tPREFIX\tNAME\tUSER\tROLE\tCREATED BY\tCREATED\tLAST USED\tEXPIRES\tSTATE", rows)
		}),
	}
	ls.Flags().BoolVar(&all, "all", false, "every member's keys (admins)")
	revoke := &cobra.Command{
		Use:   "revoke ID|PREFIX",
		Short: "Revoke a key: it fails on its next use",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (*v1.ApiKey, error) {
			return c.RevokeKey(ctx, args[0])
		}, asIs, func(k *v1.ApiKey) { fmt.Fprintf(e.out, "revoked %s (%s)\n", k.Prefix, k.Name) }),
	}
	cmd.AddCommand(create, ls, revoke)
	return cmd
}

func readAllLimited(r io.Reader, n int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, n+1))
	if err == nil && int64(len(b)) > n {
		err = fmt.Errorf("input longer than %d bytes", n)
	}
	return b, err
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
