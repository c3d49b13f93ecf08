// Command fedprobe runs inside a sandbox and gets cloud credentials the way
// an application would: through each SDK's default credential chain, with
// nothing configured but what chalkd put in the sandbox's environment. It
// prints what it got as one JSON object.
//
//	fedprobe aws   aws-sdk-go-v2: LoadDefaultConfig, then sts:GetCallerIdentity signed with the assumed role's keys
//	fedprobe gcp   golang.org/x/oauth2/google: FindDefaultCredentials, then a token
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"golang.org/x/oauth2/google"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: fedprobe aws|gcp")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out map[string]string
	var err error
	switch os.Args[1] {
	case "aws":
		out, err = probeAWS(ctx)
	case "gcp":
		out, err = probeGCP(ctx)
	default:
		err = fmt.Errorf("unknown cloud %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fedprobe:", err)
		os.Exit(1)
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

func probeAWS(ctx context.Context) (map[string]string, error) {
	cfg, err := config.LoadDefaultConfig(ctx)
	if err != nil {
		return nil, fmt.Errorf("LoadDefaultConfig: %w", err)
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		return nil, fmt.Errorf("credentials: %w", err)
	}
	id, err := sts.NewFromConfig(cfg).GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
	if err != nil {
		return nil, fmt.Errorf("GetCallerIdentity: %w", err)
	}
	arn := ""
	if id.Arn != nil {
		arn = *id.Arn
	}
	return map[string]string{"region": cfg.Region, "access_key_id": creds.AccessKeyID, "source": creds.Source, "arn": arn}, nil
}

func probeGCP(ctx context.Context) (map[string]string, error) {
	creds, err := google.FindDefaultCredentials(ctx, "https://www.googleapis.com/auth/cloud-platform")
	if err != nil {
		return nil, fmt.Errorf("FindDefaultCredentials: %w", err)
	}
	tok, err := creds.TokenSource.Token()
	if err != nil {
		return nil, fmt.Errorf("token: %w", err)
	}
	return map[string]string{"access_token": tok.AccessToken}, nil
}
