package registry

import (
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

const (
	mtManifest = "application/vnd.oci.image.manifest.v1+json"
	mtIndex    = "application/vnd.oci.image.index.v1+json"
	mtEmpty    = "application/vnd.oci.empty.v1+json"
)

// call sends method path (with body, as contentType) to r with cred and
// returns the response and its body.
func call(t *testing.T, r *Registry, method, path string, cred *Credential, contentType string, body []byte) (*http.Response, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(t.Context(), method, "http://"+r.Addr()+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("Accept", mtManifest+", "+mtIndex) // distribution hides OCI manifests from clients that do not accept them
	if cred != nil {
		req.SetBasicAuth(cred.Username, cred.Password)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the answer: %v", method, path, err)
	}
	return resp, b
}

func mustDigest(t *testing.T, s string) digest.Digest {
	t.Helper()
	d, err := digest.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func sha256Of(b []byte) string { s := sha256.Sum256(b); return "sha256:" + hex.EncodeToString(s[:]) }
func sha512Of(b []byte) string { s := sha512.Sum512(b); return "sha512:" + hex.EncodeToString(s[:]) }

// wantStatus fails t unless resp has status want (and, if code is not "",
// an error body with that code).
func wantStatus(t *testing.T, what string, resp *http.Response, body []byte, want int, code string) {
	t.Helper()
	if resp.StatusCode != want {
		t.Fatalf("%s: status %d, want %d: %s", what, resp.StatusCode, want, body)
	}
	if code != "" && !strings.Contains(string(body), `"code":"`+code+`"`) {
		t.Fatalf("%s: answer %s, want error code %s", what, body, code)
	}
}

// blob uploads data to repo with digest d, as a POST opening an upload
// session and a PUT closing it.
func blob(t *testing.T, r *Registry, repo string, data []byte, d string) {
	t.Helper()
	push := r.Credentials().Push
	resp, body := call(t, r, http.MethodPost, "/v2/"+repo+"/blobs/uploads/", &push, "", nil)
	wantStatus(t, "upload start", resp, body, http.StatusAccepted, "")
	loc := resp.Header.Get("Location")
	if strings.Contains(loc, "/blobs/sha") {
		t.Fatalf("upload session location rewritten: %s", loc)
	}
	u, err := url.Parse(loc)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("digest", d)
	resp, body = call(t, r, http.MethodPut, u.Path+"?"+q.Encode(), &push, "application/octet-stream", data)
	wantStatus(t, "upload of "+d, resp, body, http.StatusCreated, "")
	if got := resp.Header.Get("Docker-Content-Digest"); got != d {
		t.Fatalf("upload of %s: Docker-Content-Digest %q", d, got)
	}
	if got := resp.Header.Get("Location"); !strings.HasSuffix(got, "/v2/"+repo+"/blobs/"+d) {
		t.Fatalf("upload of %s: Location %q", d, got)
	}
}

// imageManifest returns an image manifest whose config and layer are in
// repo (uploaded under sha256 or sha512, per digestOf), with extra fields.
func imageManifest(t *testing.T, r *Registry, repo string, digestOf func([]byte) string, extra map[string]any) []byte {
	t.Helper()
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	layer := []byte("layer " + t.Name() + fmt.Sprint(len(extra)))
	blob(t, r, repo, config, digestOf(config))
	blob(t, r, repo, layer, digestOf(layer))
	m := map[string]any{
		"schemaVersion": 2,
		"mediaType":     mtManifest,
		"config":        map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digestOf(config), "size": len(config)},
		"layers":        []any{map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digestOf(layer), "size": len(layer)}},
	}
	for k, v := range extra {
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func index(t *testing.T, children ...map[string]any) []byte {
	t.Helper()
	ms := []any{}
	for _, c := range children {
		ms = append(ms, c)
	}
	b, err := json.Marshal(map[string]any{"schemaVersion": 2, "mediaType": mtIndex, "manifests": ms})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func child(mediaType string, b []byte, platform map[string]string) map[string]any {
	c := map[string]any{"mediaType": mediaType, "digest": sha256Of(b), "size": len(b)}
	if platform != nil {
		c["platform"] = platform
	}
	return c
}

// TestNestedIndexPut: an index whose children have no platform (an index of
// indexes) is stored; distribution's own child check dereferenced the
// missing platform and the panic dropped the connection. The children that
// must exist still must: those without a platform and those of the node's
// platform; another platform's may be absent (pull-through keeps only ours).
func TestNestedIndexPut(t *testing.T) {
	r := newTestRegistry(t, Config{})
	push := r.Credentials().Push
	const repo = "chalk.local/nested"
	img := imageManifest(t, r, repo, sha256Of, nil)
	resp, body := call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+sha256Of(img), &push, mtManifest, img)
	wantStatus(t, "image put", resp, body, http.StatusCreated, "")

	inner := index(t, child(mtManifest, img, map[string]string{"os": "linux", "architecture": runtime.GOARCH}))
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+sha256Of(inner), &push, mtIndex, inner)
	wantStatus(t, "inner index put", resp, body, http.StatusCreated, "")
	outer := index(t, child(mtIndex, inner, nil), child(mtManifest, img, nil))
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/outer", &push, mtIndex, outer)
	wantStatus(t, "index of indexes put", resp, body, http.StatusCreated, "")
	resp, body = call(t, r, http.MethodGet, "/v2/"+repo+"/manifests/outer", &push, "", nil)
	wantStatus(t, "index of indexes get", resp, body, http.StatusOK, "")
	if !bytes.Equal(body, outer) || resp.Header.Get("Docker-Content-Digest") != sha256Of(outer) {
		t.Errorf("index of indexes read back as %s (%s)", body, resp.Header.Get("Docker-Content-Digest"))
	}

	missing := []byte(`{"schemaVersion":2,"mediaType":"` + mtManifest + `","note":"never pushed"}`)
	other := "s390x"
	if runtime.GOARCH == other {
		other = "arm64"
	}
	for _, tc := range []struct {
		name   string
		index  []byte
		status int
		code   string
	}{
		{"missing child without platform", index(t, child(mtIndex, missing, nil)), http.StatusBadRequest, "MANIFEST_BLOB_UNKNOWN"},
		{"missing child of our platform", index(t, child(mtManifest, missing, map[string]string{"os": "linux", "architecture": runtime.GOARCH})), http.StatusBadRequest, "MANIFEST_BLOB_UNKNOWN"},
		{"missing child of another platform", index(t, child(mtManifest, img, nil), child(mtManifest, missing, map[string]string{"os": "linux", "architecture": other})), http.StatusCreated, ""},
		{"malformed child digest", []byte(`{"schemaVersion":2,"mediaType":"` + mtIndex + `","manifests":[{"mediaType":"` + mtManifest + `","digest":"sha256:zz","size":1}]}`), http.StatusBadRequest, "MANIFEST_INVALID"},
	} {
		resp, body := call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+sha256Of(tc.index), &push, mtIndex, tc.index)
		wantStatus(t, tc.name, resp, body, tc.status, tc.code)
	}
}

// TestPanicIsAnswered: a panic while serving a request is logged as an
// error and answered 500 (net/http alone drops the connection, which is how
// the nested index put failed), or aborts a half-written answer.
func TestPanicIsAnswered(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	srv := httptest.NewServer(&recoverHandler{log: log, next: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/half" {
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte("partial"))
			w.(http.Flusher).Flush()
		}
		var p *struct{ x int }
		_ = p.x // nil dereference
	})})
	t.Cleanup(srv.Close)

	resp, err := http.Get(srv.URL + "/v2/x/manifests/t")
	if err != nil {
		t.Fatalf("a panicking handler dropped the connection: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusInternalServerError || !strings.Contains(string(body), `"code":"UNKNOWN"`) {
		t.Errorf("panic answered %d %s, want 500 UNKNOWN", resp.StatusCode, body)
	}
	if !strings.Contains(logs.String(), "level=ERROR") || !strings.Contains(logs.String(), "nil pointer dereference") {
		t.Errorf("panic not logged as an error with its cause: %s", logs.String())
	}

	resp, err = http.Get(srv.URL + "/half")
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Error("a half-written answer cut by a panic read as complete")
	}
}

// TestReferrers: the referrers API lists the manifests whose subject is a
// digest, with their artifact type (the manifest's, else its config's media
// type) and annotations, filters by artifactType, forgets deleted and failed
// puts, is bounded per subject, and sits behind the registry's auth.
func TestReferrers(t *testing.T) {
	r := newTestRegistry(t, Config{})
	creds := r.Credentials()
	push, pull := creds.Push, creds.Pull
	const repo = "chalk.local/refs"
	subjectBody := imageManifest(t, r, repo, sha256Of, nil)
	subject := sha256Of(subjectBody)
	resp, body := call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/v1", &push, mtManifest, subjectBody)
	wantStatus(t, "subject put", resp, body, http.StatusCreated, "")

	empty := []byte("{}")
	blob(t, r, repo, empty, sha256Of(empty))
	subj := map[string]any{"mediaType": mtManifest, "digest": subject, "size": len(subjectBody)}
	emptyDesc := map[string]any{"mediaType": mtEmpty, "digest": sha256Of(empty), "size": 2}
	sig, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": mtManifest, "artifactType": "application/vnd.example.sig",
		"config": emptyDesc, "layers": []any{emptyDesc}, "subject": subj,
		"annotations": map[string]string{"org.example.signer": "ci"},
	})
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+sha256Of(sig), &push, mtManifest, sig)
	wantStatus(t, "referrer put by digest", resp, body, http.StatusCreated, "")
	if got := resp.Header.Get("OCI-Subject"); got != subject {
		t.Errorf("OCI-Subject = %q, want %s", got, subject)
	}
	sbom := imageManifest(t, r, repo, sha256Of, map[string]any{"subject": subj})
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/sbom", &push, mtManifest, sbom)
	wantStatus(t, "referrer put by tag", resp, body, http.StatusCreated, "")
	if got := resp.Header.Get("OCI-Subject"); got != subject {
		t.Errorf("OCI-Subject (tag put) = %q, want %s", got, subject)
	}
	resp, _ = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/v2", &push, mtManifest, imageManifest(t, r, repo, sha256Of, map[string]any{"x": 1}))
	if got := resp.Header.Get("OCI-Subject"); got != "" {
		t.Errorf("OCI-Subject on a put without a subject: %q", got)
	}

	type list struct {
		SchemaVersion int          `json:"schemaVersion"`
		MediaType     string       `json:"mediaType"`
		Manifests     []descriptor `json:"manifests"`
	}
	referrers := func(query string, cred *Credential) (list, *http.Response) {
		t.Helper()
		resp, body := call(t, r, http.MethodGet, "/v2/"+repo+"/referrers/"+subject+query, cred, "", nil)
		wantStatus(t, "referrers"+query, resp, body, http.StatusOK, "")
		if ct := resp.Header.Get("Content-Type"); ct != mtIndex {
			t.Errorf("referrers Content-Type %q", ct)
		}
		var l list
		if err := json.Unmarshal(body, &l); err != nil || l.SchemaVersion != 2 || l.MediaType != mtIndex {
			t.Fatalf("referrers answer %s: %v", body, err)
		}
		return l, resp
	}
	want := []descriptor{
		{MediaType: mtManifest, Digest: sha256Of(sig), Size: int64(len(sig)), ArtifactType: "application/vnd.example.sig", Annotations: map[string]string{"org.example.signer": "ci"}},
		{MediaType: mtManifest, Digest: sha256Of(sbom), Size: int64(len(sbom)), ArtifactType: "application/vnd.oci.image.config.v1+json"},
	}
	byDigest := func(l []descriptor) map[string]descriptor {
		m := map[string]descriptor{}
		for _, d := range l {
			m[d.Digest] = d
		}
		return m
	}
	l, _ := referrers("", &pull) // the pull credential reads them
	got := byDigest(l.Manifests)
	if len(l.Manifests) != 2 {
		t.Errorf("referrers = %+v, want 2", l.Manifests)
	}
	for _, w := range want {
		g := got[w.Digest]
		if g.MediaType != w.MediaType || g.Size != w.Size || g.ArtifactType != w.ArtifactType || fmt.Sprint(g.Annotations) != fmt.Sprint(w.Annotations) {
			t.Errorf("referrer %s = %+v, want %+v", w.Digest, g, w)
		}
	}
	l, resp = referrers("?artifactType=application/vnd.example.sig", &pull)
	if len(l.Manifests) != 1 || l.Manifests[0].Digest != sha256Of(sig) || resp.Header.Get("OCI-Filters-Applied") != "artifactType" {
		t.Errorf("filtered referrers = %+v (OCI-Filters-Applied %q)", l.Manifests, resp.Header.Get("OCI-Filters-Applied"))
	}

	// Auth is in front: anonymous is challenged; the API is read-only.
	resp, body = call(t, r, http.MethodGet, "/v2/"+repo+"/referrers/"+subject, nil, "", nil)
	wantStatus(t, "anonymous referrers", resp, body, http.StatusUnauthorized, "UNAUTHORIZED")
	resp, body = call(t, r, http.MethodDelete, "/v2/"+repo+"/referrers/"+subject, &push, "", nil)
	wantStatus(t, "referrers delete", resp, body, http.StatusMethodNotAllowed, "UNSUPPORTED")
	resp, body = call(t, r, http.MethodGet, "/v2/"+repo+"/referrers/sha256:nothex", &pull, "", nil)
	wantStatus(t, "referrers of a malformed digest", resp, body, http.StatusBadRequest, "DIGEST_INVALID")
	resp, body = call(t, r, http.MethodGet, "/v2/"+repo+"/referrers/"+sha256Of([]byte("nothing")), &pull, "", nil)
	wantStatus(t, "referrers of an unknown digest", resp, body, http.StatusOK, "")
	if !strings.Contains(string(body), `"manifests":[]`) {
		t.Errorf("referrers of an unknown digest: %s, want an empty list", body)
	}

	// A deleted referrer is gone from the list, and so is its record.
	resp, body = call(t, r, http.MethodDelete, "/v2/"+repo+"/manifests/"+sha256Of(sig), &push, "", nil)
	wantStatus(t, "referrer delete", resp, body, http.StatusAccepted, "")
	if l, _ := referrers("", &pull); len(l.Manifests) != 1 || l.Manifests[0].Digest != sha256Of(sbom) {
		t.Errorf("referrers after a delete = %+v", l.Manifests)
	}
	h := r.oci
	if _, err := os.Stat(h.referrerPath(repo, mustDigest(t, subject), mustDigest(t, sha256Of(sig)))); !os.IsNotExist(err) {
		t.Errorf("record of the deleted referrer: %v", err)
	}

	// A put that fails (its layer is missing) leaves no referrer behind.
	bad, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": mtManifest, "artifactType": "application/vnd.example.bad",
		"config": emptyDesc, "layers": []any{map[string]any{"mediaType": "application/octet-stream", "digest": sha256Of([]byte("absent")), "size": 6}},
		"subject": subj,
	})
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+sha256Of(bad), &push, mtManifest, bad)
	wantStatus(t, "referrer put with a missing layer", resp, body, http.StatusBadRequest, "MANIFEST_BLOB_UNKNOWN")
	if entries, _ := os.ReadDir(h.subjectDir(repo, mustDigest(t, subject))); len(entries) != 1 {
		t.Errorf("records after a failed put: %d, want 1 (sbom)", len(entries))
	}

	// Bounded: no more than maxReferrers per subject.
	h.maxReferrers.Store(2)
	more := imageManifest(t, r, repo, sha256Of, map[string]any{"subject": subj, "y": 1})
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+sha256Of(more), &push, mtManifest, more)
	wantStatus(t, "second referrer", resp, body, http.StatusCreated, "")
	third := imageManifest(t, r, repo, sha256Of, map[string]any{"subject": subj, "z": 1, "zz": 2})
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+sha256Of(third), &push, mtManifest, third)
	wantStatus(t, "referrer past the bound", resp, body, http.StatusForbidden, "DENIED")
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+sha256Of(more), &push, mtManifest, more)
	wantStatus(t, "putting a recorded referrer again at the bound", resp, body, http.StatusCreated, "")
}

// TestSHA512Digests: blobs and manifests addressed by sha512 are stored,
// read, mounted and deleted by that digest, and answered with it.
func TestSHA512Digests(t *testing.T) {
	r := newTestRegistry(t, Config{})
	creds := r.Credentials()
	push, pull := creds.Push, creds.Pull
	const repo, repo2 = "chalk.local/sha512", "chalk.local/other"

	// Blob: upload (POST, then PUT ?digest=sha512), read by sha512.
	data := []byte("sha512 blob")
	blob(t, r, repo, data, sha512Of(data))
	for _, method := range []string{http.MethodHead, http.MethodGet} {
		resp, body := call(t, r, method, "/v2/"+repo+"/blobs/"+sha512Of(data), &pull, "", nil)
		wantStatus(t, method+" blob by sha512", resp, body, http.StatusOK, "")
		if resp.Header.Get("Docker-Content-Digest") != sha512Of(data) || (method == http.MethodGet && !bytes.Equal(body, data)) {
			t.Errorf("%s blob by sha512: digest %q, body %q", method, resp.Header.Get("Docker-Content-Digest"), body)
		}
	}

	// Mount by sha512 from another repository; from one without it: an
	// upload session instead.
	resp, body := call(t, r, http.MethodPost, "/v2/"+repo2+"/blobs/uploads/?mount="+sha512Of(data)+"&from="+repo, &push, "", nil)
	wantStatus(t, "mount by sha512", resp, body, http.StatusCreated, "")
	if resp.Header.Get("Docker-Content-Digest") != sha512Of(data) {
		t.Errorf("mount answered digest %q", resp.Header.Get("Docker-Content-Digest"))
	}
	resp, body = call(t, r, http.MethodGet, "/v2/"+repo2+"/blobs/"+sha512Of(data), &pull, "", nil)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		t.Errorf("mounted blob read by sha512: %d %q", resp.StatusCode, body)
	}
	resp, body = call(t, r, http.MethodPost, "/v2/"+repo2+"/blobs/uploads/?mount="+sha512Of([]byte("absent"))+"&from="+repo, &push, "", nil)
	wantStatus(t, "mount of an absent blob", resp, body, http.StatusAccepted, "")
	resp, body = call(t, r, http.MethodPost, "/v2/"+repo2+"/blobs/uploads/?mount="+sha512Of(data)+"&from="+repo, &pull, "", nil)
	wantStatus(t, "mount with the pull credential", resp, body, http.StatusForbidden, "DENIED")

	// Manifest: put, read, refuse a mismatch, delete, all by sha512.
	m := imageManifest(t, r, repo, sha512Of, nil)
	d := sha512Of(m)
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+d, &pull, mtManifest, m)
	wantStatus(t, "manifest put with the pull credential", resp, body, http.StatusForbidden, "DENIED")
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+d, &push, mtManifest, m)
	wantStatus(t, "manifest put by sha512", resp, body, http.StatusCreated, "")
	if resp.Header.Get("Docker-Content-Digest") != d || !strings.HasSuffix(resp.Header.Get("Location"), "/manifests/"+d) {
		t.Errorf("manifest put by sha512 answered digest %q, location %q", resp.Header.Get("Docker-Content-Digest"), resp.Header.Get("Location"))
	}
	for _, method := range []string{http.MethodHead, http.MethodGet} {
		resp, body = call(t, r, method, "/v2/"+repo+"/manifests/"+d, &pull, "", nil)
		wantStatus(t, method+" manifest by sha512", resp, body, http.StatusOK, "")
		if resp.Header.Get("Docker-Content-Digest") != d || (method == http.MethodGet && !bytes.Equal(body, m)) {
			t.Errorf("%s manifest by sha512: digest %q, body %s", method, resp.Header.Get("Docker-Content-Digest"), body)
		}
	}
	other := imageManifest(t, r, repo, sha512Of, map[string]any{"other": true})
	resp, body = call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+d, &push, mtManifest, other)
	wantStatus(t, "manifest put under another's sha512", resp, body, http.StatusBadRequest, "DIGEST_INVALID")
	resp, body = call(t, r, http.MethodGet, "/v2/"+repo+"/manifests/"+d, &pull, "", nil)
	if !bytes.Equal(body, m) {
		t.Errorf("manifest after a mismatched put: %s", body)
	}
	resp, body = call(t, r, http.MethodGet, "/v2/"+repo+"/manifests/"+sha512Of(other), &pull, "", nil)
	wantStatus(t, "unknown sha512 manifest", resp, body, http.StatusNotFound, "MANIFEST_UNKNOWN")
	resp, body = call(t, r, http.MethodDelete, "/v2/"+repo+"/manifests/"+d, &push, "", nil)
	wantStatus(t, "manifest delete by sha512", resp, body, http.StatusAccepted, "")
	resp, body = call(t, r, http.MethodGet, "/v2/"+repo+"/manifests/"+d, &pull, "", nil)
	wantStatus(t, "deleted sha512 manifest", resp, body, http.StatusNotFound, "MANIFEST_UNKNOWN")
}

// TestForeignLayerURLs: a layer may name https URLs (non-distributable
// layers); any other URL is refused with an error naming it, not a 500.
func TestForeignLayerURLs(t *testing.T) {
	r := newTestRegistry(t, Config{})
	push := r.Credentials().Push
	const repo = "chalk.local/foreign"
	config := []byte(`{"architecture":"amd64","os":"linux"}`)
	blob(t, r, repo, config, sha256Of(config))
	manifest := func(u string) []byte {
		b, _ := json.Marshal(map[string]any{
			"schemaVersion": 2, "mediaType": mtManifest,
			"config": map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256Of(config), "size": len(config)},
			"layers": []any{map[string]any{
				"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
				"digest":    sha256Of([]byte(u)), "size": 10, "urls": []string{u},
			}},
		})
		return b
	}
	ok := manifest("https://store.example.com/blobs/x")
	resp, body := call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+sha256Of(ok), &push, mtManifest, ok)
	wantStatus(t, "https foreign layer", resp, body, http.StatusCreated, "")
	for _, u := range []string{"http://store.example.com/x", "file:///etc/passwd", "https://store.example.com/x#frag", "https:///nohost"} {
		b := manifest(u)
		resp, body := call(t, r, http.MethodPut, "/v2/"+repo+"/manifests/"+sha256Of(b), &push, mtManifest, b)
		wantStatus(t, "foreign layer "+u, resp, body, http.StatusBadRequest, "MANIFEST_INVALID")
		if !strings.Contains(string(body), "only https URLs") {
			t.Errorf("foreign layer %s: %s, want the reason", u, body)
		}
	}
}
