package metadata

import (
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/sandboxenv"
)

// In-sandbox locations of identity files. The host keeps them in a
// per-sandbox directory bind-mounted read-only at SandboxIdentityDir (bind
// the directory, not the files: files are replaced by rename).
const (
	SandboxIdentityDir = "/run/chalk/identity"

	// ChalkTokenFileName holds a token whose audience is the Chalk API.
	ChalkTokenFileName = "token"
	// AWSTokenFileName holds a token with audience AWSAudience.
	AWSTokenFileName = "aws-web-identity-token"
	// GCPTokenFileName holds a token whose audience is the GCP provider.
	GCPTokenFileName = "gcp-token"
	// GCPCredentialsFileName is the external_account credentials file.
	GCPCredentialsFileName = "gcp-credentials.json"
	// QueryTokenFileName holds a token whose audience is the Chalk query
	// server (ChalkQueryFederation).
	QueryTokenFileName = "query-token"

	// The environment variables chalkd sets (package sandboxenv names them
	// for code inside the sandbox).
	EnvTokenFile      = sandboxenv.TokenFile
	EnvMetadataURL    = sandboxenv.MetadataURL
	EnvAPITokenFile   = sandboxenv.APITokenFile
	EnvAPIURL         = sandboxenv.APIURL
	EnvQueryURL       = sandboxenv.QueryURL
	EnvQueryTokenFile = sandboxenv.QueryTokenFile

	// AWSAudience is the audience AWS STS AssumeRoleWithWebIdentity expects.
	AWSAudience = "sts.amazonaws.com"
)

// Federation is what a sandbox needs to use its identity with one relying
// party: a token file to keep fresh (StartTokenFile with Audience at
// filepath.Join(hostDir, TokenFileName)), extra files to write once
// (WriteFiles) and environment variables to add.
type Federation struct {
	// Audience of the tokens in TokenFileName.
	Audience string
	// TokenFileName is the token file's name in SandboxIdentityDir.
	TokenFileName string
	// Files maps names in SandboxIdentityDir to contents (mode 0644).
	Files map[string][]byte
	// Env is KEY=VALUE pairs for the sandbox environment.
	Env []string
}

// WriteFiles writes f.Files into hostDir (the host side of
// SandboxIdentityDir), each replaced atomically, mode 0644.
func (f Federation) WriteFiles(hostDir string) error {
	if err := os.MkdirAll(hostDir, 0o755); err != nil {
		return fmt.Errorf("metadata: identity dir: %w", err)
	}
	for name, b := range f.Files {
		if name != filepath.Base(name) || strings.HasPrefix(name, ".") {
			return fmt.Errorf("metadata: file name %q: %w", name, errdefs.ErrInvalidArgument)
		}
		if err := writeFileAtomic(filepath.Join(hostDir, name), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func sandboxPath(name string) string { return SandboxIdentityDir + "/" + name }

// ChalkAPIFederation is the sandbox's own identity toward chalkd's API: a
// token file with audience apiAudience, named by CHALK_IDENTITY_TOKEN_FILE
// and CHALK_API_TOKEN_FILE (which the chalk CLI and SDKs read), plus
// CHALK_METADATA_URL and, when apiURL is not empty, CHALK_API_URL (the API
// as reachable from inside the sandbox). No user credential is involved.
func ChalkAPIFederation(apiAudience, apiURL string) (Federation, error) {
	if apiAudience == "" || strings.ContainsAny(apiAudience, " ,\t\r\n") {
		return Federation{}, fmt.Errorf("metadata: API audience %q: %w", apiAudience, errdefs.ErrInvalidArgument)
	}
	if strings.ContainsAny(apiURL, " \t\r\n") {
		return Federation{}, fmt.Errorf("metadata: API URL %q: %w", apiURL, errdefs.ErrInvalidArgument)
	}
	env := []string{
		EnvTokenFile + "=" + sandboxPath(ChalkTokenFileName),
		EnvAPITokenFile + "=" + sandboxPath(ChalkTokenFileName),
		EnvMetadataURL + "=" + URL,
	}
	if apiURL != "" {
		env = append(env, EnvAPIURL+"="+apiURL)
	}
	return Federation{Audience: apiAudience, TokenFileName: ChalkTokenFileName, Env: env}, nil
}

// ChalkQueryFederation is the sandbox's identity toward the organisation's
// Chalk query server at queryURL (an absolute http or https URL, as
// reachable from inside sandboxes): a token file whose audience is
// queryURL, named by CHALK_QUERY_TOKEN_FILE, and CHALK_QUERY_URL. `chalk
// query` inside the sandbox reads both; the server verifies the token
// against the issuer's JWKS like any OIDC relying party.
func ChalkQueryFederation(queryURL string) (Federation, error) {
	u, err := url.Parse(queryURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" ||
		strings.ContainsAny(queryURL, " ,\t\r\n") {
		return Federation{}, fmt.Errorf("metadata: query server URL %q: want an absolute http(s) URL without credentials, query or fragment: %w", queryURL, errdefs.ErrInvalidArgument)
	}
	return Federation{Audience: queryURL, TokenFileName: QueryTokenFileName, Env: []string{
		EnvQueryURL + "=" + queryURL,
		EnvQueryTokenFile + "=" + sandboxPath(QueryTokenFileName),
	}}, nil
}

var (
	awsRoleARN     = regexp.MustCompile(`^arn:aws(-cn|-us-gov|-iso|-iso-[a-z])?:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}$`)
	awsSessionName = regexp.MustCompile(`^[\w+=,.@-]{2,64}$`)
	awsRegion      = regexp.MustCompile(`^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]{1,2}$`)
)

// DefaultAWSRegion is the region a sandbox with an AWS role gets when neither
// its create request nor the node names one: the region of STS's global
// endpoint, so SDKs that insist on a region (aws-sdk-go-v2, boto3) work.
const DefaultAWSRegion = "us-east-1"

// ValidateAWS checks an AWS role ARN and region (either may be empty).
func ValidateAWS(roleARN, region string) error {
	if roleARN != "" && !awsRoleARN.MatchString(roleARN) {
		return fmt.Errorf("metadata: AWS role ARN %q: %w", roleARN, errdefs.ErrInvalidArgument)
	}
	if region != "" && !awsRegion.MatchString(region) {
		return fmt.Errorf("metadata: AWS region %q (want e.g. us-east-1): %w", region, errdefs.ErrInvalidArgument)
	}
	return nil
}

// AWSFederation lets AWS SDKs assume roleARN with the sandbox's identity
// (AssumeRoleWithWebIdentity, no static keys): AWS_ROLE_ARN and
// AWS_WEB_IDENTITY_TOKEN_FILE pointing at a token with audience
// sts.amazonaws.com, and AWS_REGION and AWS_DEFAULT_REGION (read by the Go,
// JavaScript and Java SDKs and by boto3/the CLI respectively) set to region
// (DefaultAWSRegion if empty), as EKS's pod identity webhook does.
// sessionName (optional, e.g. the sandbox id) becomes AWS_ROLE_SESSION_NAME.
func AWSFederation(roleARN, sessionName, region string) (Federation, error) {
	if roleARN == "" {
		return Federation{}, fmt.Errorf("metadata: AWS role ARN: required: %w", errdefs.ErrInvalidArgument)
	}
	if err := ValidateAWS(roleARN, region); err != nil {
		return Federation{}, err
	}
	if region == "" {
		region = DefaultAWSRegion
	}
	env := []string{
		"AWS_ROLE_ARN=" + roleARN,
		"AWS_WEB_IDENTITY_TOKEN_FILE=" + sandboxPath(AWSTokenFileName),
		"AWS_REGION=" + region,
		"AWS_DEFAULT_REGION=" + region,
	}
	if sessionName != "" {
		if !awsSessionName.MatchString(sessionName) {
			return Federation{}, fmt.Errorf("metadata: AWS role session name %q: %w", sessionName, errdefs.ErrInvalidArgument)
		}
		env = append(env, "AWS_ROLE_SESSION_NAME="+sessionName)
	}
	return Federation{Audience: AWSAudience, TokenFileName: AWSTokenFileName, Env: env}, nil
}

var (
	gcpProvider = regexp.MustCompile(`^(?://iam\.googleapis\.com/)?(projects/[0-9]{1,20}/locations/global/workloadIdentityPools/[a-z0-9-]{4,32}/providers/[a-z0-9-]{4,32})$`)
	gcpSAEmail  = regexp.MustCompile(`^[a-z0-9-]{6,30}@[a-z0-9.-]+\.gserviceaccount\.com$`)
)

// ValidateGCP checks a GCP workload identity provider and service account
// (either may be empty; a service account needs a provider).
func ValidateGCP(provider, serviceAccount string) error {
	if provider != "" && !gcpProvider.MatchString(provider) {
		return fmt.Errorf("metadata: GCP workload identity provider %q (want projects/N/locations/global/workloadIdentityPools/P/providers/X): %w", provider, errdefs.ErrInvalidArgument)
	}
	if serviceAccount != "" {
		if provider == "" {
			return fmt.Errorf("metadata: GCP service account %q: needs a GCP workload identity provider: %w", serviceAccount, errdefs.ErrInvalidArgument)
		}
		if !gcpSAEmail.MatchString(serviceAccount) {
			return fmt.Errorf("metadata: GCP service account %q (want NAME@PROJECT.iam.gserviceaccount.com): %w", serviceAccount, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// GCPCredentials is an external_account credentials file (the format
// Google's client libraries read from GOOGLE_APPLICATION_CREDENTIALS).
type GCPCredentials struct {
	Type                           string              `json:"type"`
	Audience                       string              `json:"audience"`
	SubjectTokenType               string              `json:"subject_token_type"`
	TokenURL                       string              `json:"token_url"`
	CredentialSource               GCPCredentialSource `json:"credential_source"`
	ServiceAccountImpersonationURL string              `json:"service_account_impersonation_url,omitempty"`
}

// GCPCredentialSource points at the token file.
type GCPCredentialSource struct {
	File   string            `json:"file"`
	Format map[string]string `json:"format"`
}

// GCPFederation lets Google client libraries use the sandbox's identity
// through workload identity federation: provider is
// //iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X
// (the leading //iam.googleapis.com/ may be omitted) and is also the token
// audience. With serviceAccount (optional) the federated token impersonates
// that service account; without it, resources must grant the federated
// principal directly.
func GCPFederation(provider, serviceAccount string) (Federation, error) {
	m := gcpProvider.FindStringSubmatch(provider)
	if m == nil {
		return Federation{}, fmt.Errorf("metadata: GCP workload identity provider %q: %w", provider, errdefs.ErrInvalidArgument)
	}
	aud := "//iam.googleapis.com/" + m[1]
	creds := GCPCredentials{
		Type:             "external_account",
		Audience:         aud,
		SubjectTokenType: "urn:ietf:params:oauth:token-type:jwt",
		TokenURL:         "https://sts.googleapis.com/v1/token",
		CredentialSource: GCPCredentialSource{File: sandboxPath(GCPTokenFileName), Format: map[string]string{"type": "text"}},
	}
	if serviceAccount != "" {
		if !gcpSAEmail.MatchString(serviceAccount) {
			return Federation{}, fmt.Errorf("metadata: GCP service account %q: %w", serviceAccount, errdefs.ErrInvalidArgument)
		}
		creds.ServiceAccountImpersonationURL = "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/" + serviceAccount + ":generateAccessToken"
	}
	b, err := json.MarshalIndent(creds, "", "  ")
	if err != nil {
		return Federation{}, fmt.Errorf("metadata: GCP credentials: %w", err)
	}
	return Federation{
		Audience:      aud,
		TokenFileName: GCPTokenFileName,
		Files:         map[string][]byte{GCPCredentialsFileName: append(b, '\n')},
		Env:           []string{"GOOGLE_APPLICATION_CREDENTIALS=" + sandboxPath(GCPCredentialsFileName)},
	}, nil
}
