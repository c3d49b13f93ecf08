// Package sandboxenv names the environment variables chalkd sets in every
// sandbox, for the code that reads them inside (the chalk CLI, SDKs). It has
// no dependencies, so the chalk binary mounted into each sandbox does not
// link the server side (identity issuer, JOSE) to learn a few names.
package sandboxenv

const (
	// TokenFile names the Chalk API token file inside the sandbox.
	TokenFile = "CHALK_IDENTITY_TOKEN_FILE"
	// MetadataURL is the metadata service's URL inside the sandbox.
	MetadataURL = "CHALK_METADATA_URL"
	// APITokenFile and APIURL are what the chalk CLI and SDKs read (the SDK
	// re-reads the token file at each call).
	APITokenFile = "CHALK_API_TOKEN_FILE"
	APIURL       = "CHALK_API_URL"
	// QueryURL and QueryTokenFile tell `chalk query` where the
	// organisation's Chalk query server is and which token to present.
	QueryURL       = "CHALK_QUERY_URL"
	QueryTokenFile = "CHALK_QUERY_TOKEN_FILE"
)
