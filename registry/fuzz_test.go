package registry

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"

	v2 "github.com/distribution/distribution/v3/registry/api/v2"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"
)

// FuzzLocalRef checks that any reference LocalRef accepts maps into the
// embedded registry, parses again, and maps to itself.
func FuzzLocalRef(f *testing.F) {
	for _, s := range []string{
		"busybox", "python:3.11-slim-bookworm", "ghcr.io/org/x:tag", "nvcr.io/nvidia/pytorch:24.01-py3",
		"localhost:5000/a/b:c", "x@sha256:" + strings.Repeat("a", 64), "a:b@sha256:" + strings.Repeat("1", 64),
		"", ":", "@", "UPPER", "a//b", "docker.io/library/../x",
	} {
		f.Add(s)
	}
	r := &Registry{addr: "127.0.0.1:5000"}
	var err error
	if r.host, err = name.NewRegistry(r.addr, name.Insecure); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, ref string) {
		local, err := r.LocalRef(ref)
		if err != nil {
			return
		}
		s := local.String()
		if !strings.HasPrefix(s, r.addr+"/") {
			t.Fatalf("LocalRef(%q) = %q, not in the embedded registry", ref, s)
		}
		again, err := r.LocalRef(s)
		if err != nil {
			t.Fatalf("LocalRef(%q) = %q does not parse again: %v", ref, s, err)
		}
		if again.String() != s {
			t.Fatalf("LocalRef not idempotent: %q -> %q -> %q", ref, s, again)
		}
	})
}

// FuzzTagPut checks that every request distribution's router takes for a
// manifest put by tag is one tagPut sees, with the same repository and tag:
// otherwise a put could move a tag past the immutability check.
func FuzzTagPut(f *testing.F) {
	for _, s := range []string{
		"/v2/docker.io/library/busybox/manifests/latest",
		"/v2/chalk.local/build/manifests/0123abcd",
		"/v2/a/manifests/sha256:" + strings.Repeat("a", 64),
		"/v2/a/manifests/b/manifests/t",
		"/v2/manifests/manifests/manifests",
		"/v2/a/manifests/", "/v2//a/manifests/t", "/v2/a/./manifests/t", "/v2/a/manifests/t/",
	} {
		f.Add(s)
	}
	router := v2.Router()
	f.Fuzz(func(t *testing.T, path string) {
		req := &http.Request{Method: http.MethodPut, URL: &url.URL{Path: path}, Header: http.Header{}}
		var m mux.RouteMatch
		if !router.Match(req, &m) || m.MatchErr != nil || m.Route.GetName() != v2.RouteNameManifest {
			return
		}
		if m.Handler != nil {
			// The router's routes have no handlers of their own: this is
			// its redirect of an unclean path (StrictSlash), not a put. The
			// redirected request comes through tagPut again.
			return
		}
		ref := m.Vars["reference"]
		if strings.Contains(ref, ":") {
			return // a digest
		}
		repo, tag, ok := tagPut(req)
		if !ok || repo != m.Vars["name"] || tag != ref {
			t.Fatalf("%q: distribution puts tag %s:%s; tagPut = %q, %q, %v", path, m.Vars["name"], ref, repo, tag, ok)
		}
	})
}

// FuzzParseRoute checks that parseRoute reads every manifest, blob and
// upload path distribution's router takes as distribution does (same
// repository, same reference): otherwise a request could reach distribution
// past the checks of ociHandler (index children, subjects, digest aliases).
func FuzzParseRoute(f *testing.F) {
	for _, s := range []string{
		"/v2/docker.io/library/busybox/manifests/latest",
		"/v2/a/manifests/sha512:" + strings.Repeat("a", 128),
		"/v2/a/blobs/sha256:" + strings.Repeat("a", 64),
		"/v2/a/blobs/uploads/", "/v2/a/blobs/uploads/0123-abcd",
		"/v2/a/blobs/uploads/x/manifests/t", "/v2/a/manifests/blobs/uploads/",
		"/v2/blobs/blobs/blobs", "/v2/a/referrers/manifests/t",
	} {
		f.Add(s)
	}
	router := v2.Router()
	f.Fuzz(func(t *testing.T, path string) {
		for _, method := range []string{http.MethodGet, http.MethodPut, http.MethodPost} {
			req := &http.Request{Method: method, URL: &url.URL{Path: path}, Header: http.Header{}}
			var m mux.RouteMatch
			if !router.Match(req, &m) || m.MatchErr != nil || m.Handler != nil {
				continue
			}
			var kind, ref string
			switch m.Route.GetName() {
			case v2.RouteNameManifest:
				kind, ref = "manifests", m.Vars["reference"]
			case v2.RouteNameBlob:
				kind, ref = "blobs", m.Vars["digest"]
			case v2.RouteNameBlobUpload:
				kind = "uploads"
			case v2.RouteNameBlobUploadChunk:
				kind, ref = "uploads", m.Vars["uuid"]
			default:
				continue
			}
			rt, ok := parseRoute(path)
			if !ok || rt.name != m.Vars["name"] || rt.kind != kind || rt.ref != ref {
				t.Fatalf("%s %q: distribution routes %s of %q, ref %q; parseRoute = %+v, %v", method, path, kind, m.Vars["name"], ref, rt, ok)
			}
		}
	})
}

// FuzzManifestPut sends arbitrary manifests (by tag, by sha256 or sha512
// digest, under each manifest media type) to a real registry, with the push
// credential: each is stored (201) or refused as the client's fault (4xx),
// never a server error or a dropped answer; a stored one reads back as sent.
func FuzzManifestPut(f *testing.F) {
	seeds := []string{
		`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`,
		`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:` + strings.Repeat("a", 64) + `","size":2}]}`,
		`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[],"subject":{"mediaType":"x","digest":"sha256:` + strings.Repeat("b", 64) + `","size":1}}`,
		`{"schemaVersion":3}`, `{"schemaVersion":2,"manifests":null}`, `[]`, `null`, ``,
		`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:zz"},"layers":[{"urls":["http://x"]}]}`,
	}
	for i, s := range seeds {
		f.Add([]byte(s), uint8(i))
	}
	r, err := New(f.Context(), Config{RootDir: f.TempDir()})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { r.Close() })
	// The empty config blob, so that valid image manifests can be stored.
	req := httptest.NewRequest(http.MethodPost, "/v2/fuzz/blobs/uploads/?digest=sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", strings.NewReader("{}"))
	push := r.Credentials().Push
	req.SetBasicAuth(push.Username, push.Password)
	rec := httptest.NewRecorder()
	r.srv.Handler.ServeHTTP(rec, req)
	if rec.Code != http.StatusCreated {
		f.Fatalf("config blob: %d %s", rec.Code, rec.Body)
	}
	mediaTypes := []string{
		"application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
		"application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.distribution.manifest.list.v2+json",
		"", "text/plain",
	}
	f.Fuzz(func(t *testing.T, body []byte, sel uint8) {
		mt := mediaTypes[int(sel)%len(mediaTypes)]
		ref := "t" + strconv.Itoa(int(sel)) // a tag
		switch sel / 64 {
		case 1:
			ref = digest.SHA256.FromBytes(body).String()
		case 2:
			ref = digest.SHA512.FromBytes(body).String()
		}
		req := httptest.NewRequest(http.MethodPut, "/v2/fuzz/manifests/"+ref, bytes.NewReader(body))
		if mt != "" {
			req.Header.Set("Content-Type", mt)
		}
		req.SetBasicAuth(push.Username, push.Password)
		rec := httptest.NewRecorder()
		r.srv.Handler.ServeHTTP(rec, req)
		switch {
		case rec.Code == http.StatusCreated:
			get := httptest.NewRequest(http.MethodGet, "/v2/fuzz/manifests/"+rec.Header().Get("Docker-Content-Digest"), nil)
			get.Header.Set("Accept", manifestMediaTypes)
			get.SetBasicAuth(push.Username, push.Password)
			got := httptest.NewRecorder()
			r.srv.Handler.ServeHTTP(got, get)
			if got.Code != http.StatusOK || !bytes.Equal(got.Body.Bytes(), body) {
				t.Fatalf("stored manifest %s reads back %d %q, want %q", rec.Header().Get("Docker-Content-Digest"), got.Code, got.Body, body)
			}
		case rec.Code == http.StatusConflict && sel/64 == 0: // an immutable tag taken by an earlier input
		case rec.Code >= 400 && rec.Code < 500:
		default:
			t.Fatalf("PUT %s (%s) of %q: %d %s", ref, mt, body, rec.Code, rec.Body)
		}
	})
}
