package metadata

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func TestAWSFederation(t *testing.T) {
	tests := []struct {
		arn, session, region string
		ok                   bool
		wantRegion           string
	}{
		{"arn:aws:iam::123456789012:role/chalk-sandbox", "sbx-a", "", true, DefaultAWSRegion},
		{"arn:aws:iam::123456789012:role/path/to/role", "", "eu-west-1", true, "eu-west-1"},
		{"arn:aws-cn:iam::123456789012:role/r", "", "cn-north-1", true, "cn-north-1"},
		{"arn:aws-us-gov:iam::123456789012:role/r", "", "us-gov-west-1", true, "us-gov-west-1"},
		{"arn:aws:iam::123456789012:role/r", "", "ap-southeast-2", true, "ap-southeast-2"},
		{"arn:aws:iam::123456789012:user/alice", "", "", false, ""},
		{"arn:aws:iam::12345:role/r", "", "", false, ""},
		{"arn:aws:sts::123456789012:assumed-role/r/s", "", "", false, ""},
		{"arn:aws:iam::123456789012:role/r\nAWS_SECRET_ACCESS_KEY=x", "", "", false, ""},
		{"", "", "", false, ""},
		{"", "", "us-east-1", false, ""},
		{"arn:aws:iam::123456789012:role/r", "bad session name", "", false, ""},
		{"arn:aws:iam::123456789012:role/r", "", "US-EAST-1", false, ""},
		{"arn:aws:iam::123456789012:role/r", "", "us-east-1\nAWS_ACCESS_KEY_ID=x", false, ""},
		{"arn:aws:iam::123456789012:role/r", "", "useast1", false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.arn+"/"+tt.session+"/"+tt.region, func(t *testing.T) {
			f, err := AWSFederation(tt.arn, tt.session, tt.region)
			if !tt.ok {
				if !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("AWSFederation = %+v, %v; want ErrInvalidArgument", f, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := []string{"AWS_ROLE_ARN=" + tt.arn, "AWS_WEB_IDENTITY_TOKEN_FILE=/run/chalk/identity/aws-web-identity-token",
				"AWS_REGION=" + tt.wantRegion, "AWS_DEFAULT_REGION=" + tt.wantRegion}
			if tt.session != "" {
				want = append(want, "AWS_ROLE_SESSION_NAME="+tt.session)
			}
			if !slices.Equal(f.Env, want) || f.Audience != "sts.amazonaws.com" || f.TokenFileName != AWSTokenFileName || len(f.Files) != 0 {
				t.Fatalf("AWSFederation = %+v, want env %v", f, want)
			}
		})
	}
}

func TestValidateGCP(t *testing.T) {
	const p = "projects/123456/locations/global/workloadIdentityPools/chalk-pool/providers/chalk-oidc"
	for _, tt := range []struct {
		provider, sa string
		ok           bool
	}{
		{"", "", true},
		{p, "", true},
		{p, "reader@my-project.iam.gserviceaccount.com", true},
		{"", "reader@my-project.iam.gserviceaccount.com", false}, // impersonation needs a provider
		{p, "reader@example.com", false},
		{"projects/x", "", false},
	} {
		err := ValidateGCP(tt.provider, tt.sa)
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, errdefs.ErrInvalidArgument)) {
			t.Errorf("ValidateGCP(%q, %q) = %v, want ok=%v", tt.provider, tt.sa, err, tt.ok)
		}
	}
}

func TestGCPFederation(t *testing.T) {
	const full = "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/chalk-pool/providers/chalk-oidc"
	tests := []struct {
		provider, sa string
		ok           bool
	}{
		{full, "", true},
		{full[len("//iam.googleapis.com/"):], "", true},
		{full, "reader@my-project.iam.gserviceaccount.com", true},
		{full, "not-an-email", false},
		{"//iam.googleapis.com/projects/my-project/locations/global/workloadIdentityPools/p/providers/x", "", false},
		{"projects/1/locations/us-east1/workloadIdentityPools/pool1/providers/prov1", "", false},
		{"https://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/pool1/providers/prov1", "", false},
		{"", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.provider+"/"+tt.sa, func(t *testing.T) {
			f, err := GCPFederation(tt.provider, tt.sa)
			if !tt.ok {
				if !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("GCPFederation = %+v, %v; want ErrInvalidArgument", f, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if f.Audience != full || f.TokenFileName != GCPTokenFileName ||
				!slices.Equal(f.Env, []string{"GOOGLE_APPLICATION_CREDENTIALS=/run/chalk/identity/gcp-credentials.json"}) {
				t.Fatalf("GCPFederation = %+v", f)
			}
			var creds map[string]any
			if err := json.Unmarshal(f.Files[GCPCredentialsFileName], &creds); err != nil {
				t.Fatal(err)
			}
			want := map[string]any{
				"type":               "external_account",
				"audience":           full,
				"subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
				"token_url":          "https://sts.googleapis.com/v1/token",
				"credential_source":  map[string]any{"file": "/run/chalk/identity/gcp-token", "format": map[string]any{"type": "text"}},
			}
			if tt.sa != "" {
				want["service_account_impersonation_url"] = "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/" + tt.sa + ":generateAccessToken"
			}
			if got, _ := json.Marshal(creds); string(got) != mustJSON(want) {
				t.Fatalf("credentials file\n got %s\nwant %s", got, mustJSON(want))
			}
			// Written to the host side of the identity dir, 0644.
			dir := filepath.Join(t.TempDir(), "identity")
			if err := f.WriteFiles(dir); err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(filepath.Join(dir, GCPCredentialsFileName))
			if err != nil || st.Mode().Perm() != 0o644 {
				t.Fatalf("credentials file: %v %v", st, err)
			}
		})
	}
}

func TestChalkAPIFederation(t *testing.T) {
	f, err := ChalkAPIFederation("https://chalk.example.com", "http://10.88.0.1:7080")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"CHALK_IDENTITY_TOKEN_FILE=/run/chalk/identity/token", "CHALK_API_TOKEN_FILE=/run/chalk/identity/token",
		"CHALK_METADATA_URL=http://169.254.169.254", "CHALK_API_URL=http://10.88.0.1:7080",
	}
	if !slices.Equal(f.Env, want) || f.Audience != "https://chalk.example.com" || f.TokenFileName != "token" {
		t.Fatalf("ChalkAPIFederation = %+v", f)
	}
	if f, err := ChalkAPIFederation("chalk-api", ""); err != nil || len(f.Env) != 3 {
		t.Fatalf("without an API URL: %+v, %v", f, err)
	}
	for _, bad := range []string{"", "a b", "a,b"} {
		if _, err := ChalkAPIFederation(bad, ""); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("ChalkAPIFederation(%q) = %v", bad, err)
		}
	}
	if err := (Federation{Files: map[string][]byte{"../escape": nil}}).WriteFiles(t.TempDir()); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("WriteFiles with a path-escaping name = %v", err)
	}
}

func TestChalkQueryFederation(t *testing.T) {
	f, err := ChalkQueryFederation("https://query.chalk.example.com/")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"CHALK_QUERY_URL=https://query.chalk.example.com/", "CHALK_QUERY_TOKEN_FILE=/run/chalk/identity/query-token"}
	if !slices.Equal(f.Env, want) || f.Audience != "https://query.chalk.example.com/" || f.TokenFileName != "query-token" || len(f.Files) != 0 {
		t.Fatalf("ChalkQueryFederation = %+v", f)
	}
	for _, bad := range []string{"", "query.example.com", "ftp://q.example.com", "https://user:pw@q.example.com", "https://q.example.com/?a=b",
		"https://q.example.com/#x", "https://q.example.com/a b", "http://"} {
		if _, err := ChalkQueryFederation(bad); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "query server URL") {
			t.Errorf("ChalkQueryFederation(%q) = %v, want an InvalidArgument naming the URL", bad, err)
		}
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
