package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/sandboxenv"
)

// queryResult is the part of the query server's answer the CLI reads: the
// online query response of Chalk's API (POST /v1/query/online).
type queryResult struct {
	Data []struct {
		Field string          `json:"field"`
		Value json.RawMessage `json:"value"`
	} `json:"data"`
	Errors []struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"errors"`
}

// maxQueryResponse bounds what the CLI reads from the query server.
const maxQueryResponse = 64 << 20

func queryCmd(e *env) *cobra.Command {
	var inputs, outputs []string
	var queryURL, tokenFile string
	cmd := &cobra.Command{
		Use:   "query --in feature=value... --out feature...",
		Short: "Run an online query against the organisation's Chalk query server",
		Long: `Run an online query (POST <query server>/v1/query/online) and print each output
feature with its value. Inside a sandbox this needs no configuration: chalkd
started with --query-url gives every sandbox CHALK_QUERY_URL and a workload
identity token for it (CHALK_QUERY_TOKEN_FILE, re-read on every call), so the
query runs as the sandbox, never with a user's credentials. Input values are
JSON when they parse as JSON (user.id=1 is the number 1), else strings.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			body, err := queryBody(inputs, outputs)
			if err != nil {
				return err
			}
			raw, res, err := postQuery(cmd.Context(), queryURL, tokenFile, body)
			if err != nil {
				return err
			}
			// -o json: the server's answer as it is (indented).
			if err := output(e, res, func(queryResult) any { return raw }, func(res queryResult) {
				for _, d := range res.Data {
					fmt.Fprintf(e.out, "%s\t%s\n", d.Field, d.Value)
				}
			}); err != nil {
				return err
			}
			if len(res.Errors) > 0 {
				msgs := make([]string, len(res.Errors))
				for i, qe := range res.Errors {
					msgs[i] = qe.Code + ": " + qe.Message
				}
				return fmt.Errorf("query failed: %s", strings.Join(msgs, "; "))
			}
			return nil
		},
	}
	cmd.Flags().StringArrayVar(&inputs, "in", nil, "input feature=value (repeatable)")
	cmd.Flags().StringArrayVar(&outputs, "out", nil, "output feature (repeatable)")
	cmd.Flags().StringVar(&queryURL, "query-url", "", "query server URL (default $"+sandboxenv.QueryURL+")")
	cmd.Flags().StringVar(&tokenFile, "query-token-file", "", "file holding the bearer token (default $"+sandboxenv.QueryTokenFile+")")
	return cmd
}

// postQuery runs an online query on the query server at queryURL (default
// from the sandbox's environment) with the token in tokenFile (re-read on
// every call) and returns its answer.
func postQuery(ctx context.Context, queryURL, tokenFile string, body []byte) (json.RawMessage, queryResult, error) {
	var res queryResult
	if queryURL == "" {
		queryURL = os.Getenv(sandboxenv.QueryURL)
	}
	if queryURL == "" {
		return nil, res, fmt.Errorf("no Chalk query server: pass --query-url or set %s (inside a sandbox chalkd sets it when started with --query-url): %w", sandboxenv.QueryURL, errdefs.ErrFailedPrecondition)
	}
	if tokenFile == "" {
		tokenFile = os.Getenv(sandboxenv.QueryTokenFile)
	}
	if tokenFile == "" {
		return nil, res, fmt.Errorf("no token for the query server: pass --query-token-file or set %s: %w", sandboxenv.QueryTokenFile, errdefs.ErrFailedPrecondition)
	}
	tok, err := os.ReadFile(tokenFile)
	if err != nil {
		return nil, res, fmt.Errorf("query token: %w", err)
	}
	u, err := url.JoinPath(queryURL, "v1/query/online")
	if err != nil {
		return nil, res, fmt.Errorf("--query-url %q: %w (%w)", queryURL, err, errdefs.ErrInvalidArgument)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return nil, res, fmt.Errorf("--query-url %q: %w (%w)", queryURL, err, errdefs.ErrInvalidArgument)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	resp, err := (&http.Client{Timeout: 2 * time.Minute}).Do(req)
	if err != nil {
		return nil, res, fmt.Errorf("query server: %w", err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxQueryResponse+1))
	if err != nil {
		return nil, res, fmt.Errorf("query server: read answer: %w", err)
	}
	if len(raw) > maxQueryResponse {
		return nil, res, fmt.Errorf("query server: answer larger than %d MiB", maxQueryResponse>>20)
	}
	if resp.StatusCode/100 != 2 {
		return nil, res, fmt.Errorf("query server: %s: %s", resp.Status, strings.TrimSpace(string(raw[:min(len(raw), 512)])))
	}
	if err := json.Unmarshal(raw, &res); err != nil {
		return nil, res, fmt.Errorf("query server: answer is not a query result: %w", err)
	}
	return raw, res, nil
}

// queryBody is the request body of an online query; bad flags are an
// InvalidArgument naming the flag.
func queryBody(inputs, outputs []string) ([]byte, error) {
	if len(inputs) == 0 || len(outputs) == 0 {
		return nil, fmt.Errorf("query: want at least one --in feature=value and one --out feature: %w", errdefs.ErrInvalidArgument)
	}
	in := make(map[string]json.RawMessage, len(inputs))
	for _, kv := range inputs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || strings.TrimSpace(k) == "" {
			return nil, fmt.Errorf("--in %q: want feature=value: %w", kv, errdefs.ErrInvalidArgument)
		}
		if _, dup := in[k]; dup {
			return nil, fmt.Errorf("--in %q: feature %s given twice: %w", kv, k, errdefs.ErrInvalidArgument)
		}
		if json.Valid([]byte(v)) && strings.TrimSpace(v) != "" {
			in[k] = json.RawMessage(v)
		} else {
			b, _ := json.Marshal(v)
			in[k] = b
		}
	}
	for _, o := range outputs {
		if strings.TrimSpace(o) == "" || strings.ContainsAny(o, "= \t") {
			return nil, fmt.Errorf("--out %q: want a feature name: %w", o, errdefs.ErrInvalidArgument)
		}
	}
	return json.Marshal(map[string]any{"inputs": in, "outputs": outputs})
}
