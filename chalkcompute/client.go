// Package chalkcompute is the Go SDK for chalkcompute: create sandboxes from
// images, run commands in them with streamed output, move files, and manage
// images and network policies.
//
//	client, err := chalkcompute.NewClient()
//	sb, err := client.Create(ctx, chalkcompute.Base("busybox"))
//	res, err := sb.Exec(ctx, []string{"echo", "hello"})
//
// NewClient with no options finds chalkd through CHALK_API_URL and
// CHALK_API_TOKEN (or CHALK_API_TOKEN_FILE), else the config file chalkd wrote
// on first start (~/.config/chalk/config.json, or CHALK_CONFIG).
// Errors from the server wrap the errdefs classes, so
// errors.Is(err, errdefs.ErrNotFound) works.
package chalkcompute

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/atomicfile"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/errdefs/errconnect"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
)

// Client talks to one chalkd.
type Client struct {
	url      string
	token    string
	http     *http.Client
	sandbox  computev1connect.SandboxServiceClient
	images   computev1connect.ImageServiceClient
	policies computev1connect.PolicyServiceClient
	tunnels  computev1connect.TunnelServiceClient
	mcp      computev1connect.McpServiceClient
	identity computev1connect.IdentityServiceClient
	team     computev1connect.TeamServiceClient
	nodes    computev1connect.NodeAdminServiceClient
}

type options struct {
	url       string
	token     string
	tokenFile string
	org       string
	http      *http.Client
}

// Option configures a Client.
type Option func(*options)

// WithURL sets the API URL: http(s)://host:port or unix:///path/to/chalkd.sock.
func WithURL(u string) Option { return func(o *options) { o.url = u } }

// WithToken sets the API token (a user token, or a workload identity token).
func WithToken(t string) Option { return func(o *options) { o.token = t } }

// WithTokenFile reads the token from a file at each call (for refreshed workload tokens).
func WithTokenFile(p string) Option { return func(o *options) { o.tokenFile = p } }

// WithOrg picks the key for org from the config file's keys (as stored by
// `chalk auth login`); default CHALK_ORG, else the config's current org.
func WithOrg(org string) Option { return func(o *options) { o.org = org } }

// WithHTTPClient sets the HTTP client (for custom transports).
func WithHTTPClient(c *http.Client) Option { return func(o *options) { o.http = c } }

// FileConfig is the client config file chalkd writes (and `chalk auth
// login` updates): the API URL, the current key and org, and a key per org.
type FileConfig struct {
	APIURL string            `json:"api_url"`
	Token  string            `json:"token"`
	Org    string            `json:"org,omitempty"`
	Keys   map[string]string `json:"keys,omitempty"` // org -> API key
}

// ReadConfig reads the client config file (a missing file is an empty config).
func ReadConfig() (*FileConfig, error) {
	fc := &FileConfig{}
	b, err := os.ReadFile(ConfigPath())
	if errors.Is(err, os.ErrNotExist) {
		return fc, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, fc); err != nil {
		return nil, fmt.Errorf("client config %s: %v: %w", ConfigPath(), err, errdefs.ErrInvalidArgument)
	}
	return fc, nil
}

// WriteConfig writes the client config file (0600).
func WriteConfig(fc *FileConfig) error { return WriteConfigFile(ConfigPath(), fc) }

// WriteConfigFile writes fc to path (0600, its directory 0700), replacing
// the file atomically. chalkd writes its first admin key with it.
func WriteConfigFile(path string, fc *FileConfig) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	b, _ := json.MarshalIndent(fc, "", "  ")
	return atomicfile.WriteFile(path, append(b, '\n'), 0o600)
}

// ConfigPath is where the client config is read from: CHALK_CONFIG, else
// DefaultConfigPath.
func ConfigPath() string {
	if p := os.Getenv("CHALK_CONFIG"); p != "" {
		return p
	}
	return DefaultConfigPath()
}

// DefaultConfigPath is ~/.config/chalk/config.json ("" without a home).
func DefaultConfigPath() string {
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".config", "chalk", "config.json")
}

// makeOptions applies opts over the environment and the config file, and
// validates the result in one place.
func makeOptions(opts []Option) (*options, error) {
	o := &options{url: os.Getenv("CHALK_API_URL"), token: os.Getenv("CHALK_API_TOKEN"), tokenFile: os.Getenv("CHALK_API_TOKEN_FILE"), org: os.Getenv("CHALK_ORG")}
	given := &options{}
	for _, opt := range opts {
		opt(given)
	}
	if given.org != "" {
		o.org = given.org
	}
	if o.url == "" || (o.token == "" && o.tokenFile == "") || o.org != "" {
		if b, err := os.ReadFile(ConfigPath()); err == nil {
			var fc FileConfig
			if err := json.Unmarshal(b, &fc); err != nil {
				return nil, fmt.Errorf("client config %s: %v: %w", ConfigPath(), err, errdefs.ErrInvalidArgument)
			}
			if o.url == "" {
				o.url = fc.APIURL
			}
			if o.token == "" && o.tokenFile == "" && given.token == "" && given.tokenFile == "" {
				switch k, ok := fc.Keys[o.org]; {
				case o.org == "" || o.org == fc.Org && !ok:
					o.token = fc.Token
				case ok:
					o.token = k
				default:
					return nil, fmt.Errorf("no API key for org %q in %s: run 'chalk auth login --org %s --key <key>': %w", o.org, ConfigPath(), o.org, errdefs.ErrUnauthenticated)
				}
			}
		}
	}
	for _, opt := range opts {
		opt(o)
	}
	if o.url == "" {
		return nil, fmt.Errorf("no chalkd API URL: set CHALK_API_URL or run chalkd once (it writes %s): %w", ConfigPath(), errdefs.ErrInvalidArgument)
	}
	if o.token == "" && o.tokenFile == "" {
		return nil, fmt.Errorf("no API token: set CHALK_API_TOKEN or use the config chalkd wrote at %s: %w", ConfigPath(), errdefs.ErrUnauthenticated)
	}
	return o, nil
}

// NewClient returns a client for the chalkd found by opts, the environment or
// the config file.
func NewClient(opts ...Option) (*Client, error) {
	o, err := makeOptions(opts)
	if err != nil {
		return nil, err
	}
	hc := o.http
	base := strings.TrimRight(o.url, "/")
	if sock, ok := strings.CutPrefix(o.url, "unix://"); ok {
		tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}
		if hc == nil {
			hc = &http.Client{Transport: oneWrite{tr}}
		}
		base = "http://chalkd"
	}
	if hc == nil {
		hc = &http.Client{Transport: oneWrite{&http.Transport{MaxIdleConnsPerHost: 64, Proxy: nil}}}
	}
	c := &Client{url: base, token: o.token, http: hc}
	auth := connect.WithInterceptors(tokenInterceptor{token: o.token, file: o.tokenFile})
	c.sandbox = computev1connect.NewSandboxServiceClient(hc, base, auth)
	c.images = computev1connect.NewImageServiceClient(hc, base, auth)
	c.policies = computev1connect.NewPolicyServiceClient(hc, base, auth)
	c.tunnels = computev1connect.NewTunnelServiceClient(hc, base, auth)
	c.mcp = computev1connect.NewMcpServiceClient(hc, base, auth)
	c.identity = computev1connect.NewIdentityServiceClient(hc, base, auth)
	c.team = computev1connect.NewTeamServiceClient(hc, base, auth)
	c.nodes = computev1connect.NewNodeAdminServiceClient(hc, base, auth)
	return c, nil
}

// oneWriteMax bounds the request bodies oneWrite sends with their header.
const oneWriteMax = 64 << 10

// oneWrite sends a request whose body has a known length of at most
// oneWriteMax in one write with its header. Connect gives unary and
// server-stream requests such a body, but of a type net/http does not know
// to be in memory, so net/http flushed the header first and the body in a
// second write: two wake-ups of the server per call (an exec included).
type oneWrite struct{ base http.RoundTripper }

func (t oneWrite) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body == nil || req.Body == http.NoBody || req.ContentLength <= 0 || req.ContentLength > oneWriteMax {
		return t.base.RoundTrip(req)
	}
	b := make([]byte, req.ContentLength)
	_, err := io.ReadFull(req.Body, b)
	req.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("read the request body: %w", err)
	}
	r := req.Clone(req.Context())
	r.Body = io.NopCloser(bytes.NewReader(b)) // in memory: net/http writes it with the header
	return t.base.RoundTrip(r)
}

// CloseIdleConnections lets http.Client.CloseIdleConnections reach the
// transport.
func (t oneWrite) CloseIdleConnections() {
	if c, ok := t.base.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// tokenInterceptor adds the bearer token to every call.
type tokenInterceptor struct{ token, file string }

var _ connect.Interceptor = tokenInterceptor{}

func (t tokenInterceptor) bearer() string {
	if t.file != "" {
		if b, err := os.ReadFile(t.file); err == nil {
			return "Bearer " + strings.TrimSpace(string(b))
		}
	}
	return "Bearer " + t.token
}

func (t tokenInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		req.Header().Set("Authorization", t.bearer())
		resp, err := next(ctx, req)
		return resp, fromConnect(err)
	}
}

func (t tokenInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		conn.RequestHeader().Set("Authorization", t.bearer())
		return conn
	}
}

func (tokenInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// Error is an error returned by chalkd: the server's message and code.
type Error struct {
	Code    string
	Message string
	class   error
}

func (e *Error) Error() string { return e.Message }

// Unwrap returns the errdefs class of the error.
func (e *Error) Unwrap() error { return e.class }

// fromConnect turns a Connect error into an *Error wrapping its errdefs class.
func fromConnect(err error) error {
	var ce *connect.Error
	if err == nil || !errors.As(err, &ce) {
		return err
	}
	return &Error{Code: ce.Code().String(), Message: ce.Message(), class: errconnect.Class(ce.Code())}
}
