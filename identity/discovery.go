package identity

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
)

// Discovery is the OIDC discovery document (the subset a workload identity
// issuer publishes; there is no authorization endpoint).
type Discovery struct {
	Issuer                           string   `json:"issuer"`
	JWKSURI                          string   `json:"jwks_uri"`
	ResponseTypesSupported           []string `json:"response_types_supported"`
	SubjectTypesSupported            []string `json:"subject_types_supported"`
	IDTokenSigningAlgValuesSupported []string `json:"id_token_signing_alg_values_supported"`
	ClaimsSupported                  []string `json:"claims_supported"`
	ScopesSupported                  []string `json:"scopes_supported"`
}

// Discovery returns the discovery document for the current keys.
func (i *Issuer) Discovery() Discovery {
	ks := i.keys.Load()
	return Discovery{
		Issuer:                           i.cfg.Issuer,
		JWKSURI:                          i.cfg.Issuer + JWKSPath,
		ResponseTypesSupported:           []string{"id_token"},
		SubjectTypesSupported:            []string{"public"},
		IDTokenSigningAlgValuesSupported: append([]string(nil), ks.algs...),
		ClaimsSupported:                  append([]string(nil), claimsSupported...),
		ScopesSupported:                  []string{"openid"},
	}
}

// DiscoveryHandler serves the discovery document at DiscoveryPath and the
// JWKS at JWKSPath. Both paths are matched with and without the issuer
// URL's path prefix, so the handler works whether or not a proxy in front of
// it strips the prefix. Only GET and HEAD are allowed.
func (i *Issuer) DiscoveryHandler() http.Handler {
	prefix := ""
	if u, err := url.Parse(i.cfg.Issuer); err == nil {
		prefix = strings.TrimRight(u.Path, "/")
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		path := strings.TrimPrefix(r.URL.Path, prefix)
		var doc any
		var maxAge string
		switch path {
		case DiscoveryPath:
			doc, maxAge = i.Discovery(), "max-age=3600"
		case JWKSPath:
			// Keep this well below the rotation period: relying parties
			// must see a next key before it signs.
			doc, maxAge = i.JWKS(), "max-age=300"
		default:
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		b, err := json.MarshalIndent(doc, "", "  ")
		if err != nil {
			http.Error(w, "internal error", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "public, "+maxAge)
		w.Header().Set("X-Content-Type-Options", "nosniff")
		if r.Method == http.MethodHead {
			return
		}
		w.Write(append(b, '\n'))
	})
}
