package registry

import (
	"bytes"
	_ "crypto/sha512" // registers sha512 with go-digest
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"mime"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/chalkcompute/chalkcompute/atomicfile"
)

// What the OCI distribution-spec v1.1 asks of a registry that
// distribution/distribution v3 does not do, done in front of it (it sits
// behind the auth and immutable-tag handlers, so every request here has
// already been authenticated and authorised):
//
//   - The referrers API: GET /v2/<name>/referrers/<digest>[?artifactType=]
//     answers an image index of the manifests whose subject is <digest>, and
//     a manifest put with a subject answers the OCI-Subject header.
//     distribution keeps no such index, so we keep one: a small JSON
//     descriptor per (subject, referrer) under <root>/chalk-oci/referrers,
//     written before the put reaches distribution and checked against
//     distribution (does the referrer still exist?) when listed, so a failed
//     put or a deleted manifest never shows up.
//   - Manifests addressed by a digest other than sha256 (sha512):
//     distribution stores every manifest under its sha256 and refuses a put
//     by another algorithm. We verify the body against the digest in the
//     URL, store it under its sha256 and keep the alias in
//     <root>/chalk-oci/digests; reads and deletes by the alias are served as
//     the sha256 and answered with the digest the client asked for.
//   - Blobs addressed by sha512: distribution stores and links them, but
//     answers with the sha256 in Docker-Content-Digest and Location; we
//     answer with the digest the client used.
//   - Image indexes: distribution's child-manifest check dereferences the
//     platform of every child and panics on a child without one (an index
//     of indexes), which dropped the connection. distribution's check is
//     off (Platforms "none") and this one replaces it: a child must exist
//     if it has no platform or has the node's platform (pull-through keeps
//     only that one out of a multi-platform index).
//
// Everything is bounded: manifest bodies (maxManifestBytes), children of an
// index that are checked (maxIndexChildren), referrers per subject
// (defaultMaxReferrers).

const (
	// maxIndexChildren bounds the manifests of an index put.
	maxIndexChildren = 1000
	// defaultMaxReferrers bounds the referrers recorded for one subject; a
	// put that would add more is refused.
	defaultMaxReferrers = 1000
	// maxProbeManifestBytes bounds what is read of a manifest looked at
	// before its deletion.
	maxProbeManifestBytes = maxManifestBytes
)

const mediaTypeOCIIndex = "application/vnd.oci.image.index.v1+json"

// ociHandler implements the parts of the OCI distribution spec above.
type ociHandler struct {
	next http.Handler
	log  *slog.Logger
	// dir is <root>/chalk-oci.
	dir string
	// platform the children of an index must exist for ("linux", GOARCH).
	os, arch string
	// maxReferrers bounds the referrers recorded for one subject
	// (defaultMaxReferrers); a put that would add more is refused.
	// (atomic: tests lower it while the registry serves).
	maxReferrers atomic.Int64
	// recMu serialises the puts and deletes that change records.
	recMu sync.Mutex
}

// route is a parsed /v2/<name>/<kind>/<ref> path.
type route struct {
	name string
	kind string // "manifests", "blobs", "uploads", "referrers"
	ref  string
}

func parseRoute(p string) (route, bool) {
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return route{}, false
	}
	// The reference (tag, digest, upload id) is the last path element, as
	// in distribution's router: the kind is the marker right before it, and
	// the name everything before that (a name may contain "manifests").
	slash := strings.LastIndex(rest, "/")
	if slash <= 0 {
		return route{}, false
	}
	name, ref := rest[:slash], rest[slash+1:]
	for _, kind := range []string{"blobs/uploads", "manifests", "referrers", "blobs"} {
		n, ok := strings.CutSuffix(name, "/"+kind)
		if !ok || n == "" {
			continue
		}
		if kind == "blobs/uploads" {
			kind = "uploads"
		}
		return route{name: n, kind: kind, ref: ref}, true
	}
	return route{}, false
}

func (h *ociHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rt, ok := parseRoute(r.URL.Path)
	if !ok {
		h.next.ServeHTTP(w, r)
		return
	}
	if rt.kind == "referrers" {
		h.referrers(w, r, rt)
		return
	}
	if _, err := reference.WithName(rt.name); err != nil {
		h.next.ServeHTTP(w, r) // distribution answers NAME_INVALID
		return
	}
	switch rt.kind {
	case "manifests":
		switch r.Method {
		case http.MethodPut:
			h.putManifest(w, r, rt)
			return
		case http.MethodGet, http.MethodHead, http.MethodDelete:
			h.manifest(w, r, rt)
			return
		}
	case "blobs":
		if d, err := digest.Parse(rt.ref); err == nil && d.Algorithm() != digest.SHA256 {
			h.next.ServeHTTP(asDigest(w, d, 0, ""), r)
			return
		}
	case "uploads":
		q := r.URL.Query()
		if r.Method == http.MethodPost && rt.ref == "" {
			if q.Has("mount") {
				if d, err := digest.Parse(q.Get("mount")); err == nil && d.Algorithm() != digest.SHA256 && q.Get("from") != "" {
					h.mountCopy(w, r, rt, d, q.Get("from"))
					return
				}
			} else if q.Has("digest") {
				h.postUpload(w, r, rt)
				return
			}
		}
		// Completing an upload (PUT ...?digest=) or mounting (POST ...?mount=)
		// by sha512: answer with that digest.
		ds := q.Get("digest")
		if r.Method == http.MethodPost && q.Get("mount") != "" {
			ds = q.Get("mount")
		}
		if d, err := digest.Parse(ds); err == nil && d.Algorithm() != digest.SHA256 {
			h.next.ServeHTTP(asDigest(w, d, http.StatusCreated, "/v2/"+rt.name+"/blobs/"+d.String()), r)
			return
		}
	}
	h.next.ServeHTTP(w, r)
}

// asDigest answers with d as Docker-Content-Digest (and location as
// Location, if set) on a success (only on status only, if not 0: an upload
// answers 202 with the location of the upload session).
func asDigest(w http.ResponseWriter, d digest.Digest, only int, location string) http.ResponseWriter {
	return &hookWriter{ResponseWriter: w, hook: func(status int, hd http.Header) {
		if status < 200 || status > 299 || (only != 0 && status != only) {
			return
		}
		if hd.Get("Docker-Content-Digest") != "" {
			hd.Set("Docker-Content-Digest", d.String())
		}
		if hd.Get("Etag") != "" {
			hd.Set("Etag", `"`+d.String()+`"`)
		}
		if location != "" && hd.Get("Location") != "" {
			hd.Set("Location", location)
		}
	}}
}

// manifestDoc is what we read of a manifest or index.
type manifestDoc struct {
	SchemaVersion int    `json:"schemaVersion"`
	MediaType     string `json:"mediaType"`
	ArtifactType  string `json:"artifactType"`
	Config        *struct {
		MediaType string `json:"mediaType"`
		Digest    string `json:"digest"`
	} `json:"config"`
	Subject *struct {
		Digest string `json:"digest"`
	} `json:"subject"`
	Manifests []struct {
		Digest   string `json:"digest"`
		Platform *struct {
			OS           string `json:"os"`
			Architecture string `json:"architecture"`
		} `json:"platform"`
	} `json:"manifests"`
	Layers []struct {
		Digest string   `json:"digest"`
		URLs   []string `json:"urls"`
	} `json:"layers"`
	Annotations map[string]string `json:"annotations"`
}

// descriptorDigests refuses descriptors whose digest does not parse
// (distribution answers a digest of an unknown algorithm with a 500).
func descriptorDigests(doc *manifestDoc) error {
	check := func(what, d string) error {
		if _, err := digest.Parse(d); err != nil {
			return fmt.Errorf("%s digest %q: %v", what, d, err)
		}
		return nil
	}
	if doc.Config != nil {
		if err := check("config", doc.Config.Digest); err != nil {
			return err
		}
	}
	for i, l := range doc.Layers {
		if err := check(fmt.Sprintf("layer %d", i), l.Digest); err != nil {
			return err
		}
	}
	for i, m := range doc.Manifests {
		if err := check(fmt.Sprintf("manifest %d", i), m.Digest); err != nil {
			return err
		}
	}
	if doc.Subject != nil {
		return check("subject", doc.Subject.Digest)
	}
	return nil
}

// foreignURLs refuses layer URLs other than https ones (distribution refuses
// them too, but with a 500 that names nothing).
func foreignURLs(doc *manifestDoc) error {
	for i, l := range doc.Layers {
		for _, s := range l.URLs {
			u, err := url.Parse(s)
			if err != nil || u.Scheme != "https" || u.Host == "" || u.Fragment != "" {
				return fmt.Errorf("layer %d: URL %q: only https URLs without a fragment are accepted", i, s)
			}
		}
	}
	return nil
}

func isIndex(mediaType string) bool {
	return mediaType == mediaTypeOCIIndex || mediaType == "application/vnd.docker.distribution.manifest.list.v2+json"
}

// manifestPut is a manifest put as ociHandler reads it.
type manifestPut struct {
	body      []byte
	doc       manifestDoc
	mediaType string
	canonical digest.Digest // the sha256 of body, what distribution stores it under
	asked     digest.Digest // the digest the client addresses it by (canonical for a tag)
	subject   digest.Digest // "" without a subject
}

func (h *ociHandler) putManifest(w http.ResponseWriter, r *http.Request, rt route) {
	p, ok := h.readManifestPut(w, r, rt)
	if !ok {
		return
	}
	if isIndex(p.mediaType) && !h.childrenExist(w, r, rt, &p.doc) {
		return
	}
	if p.subject != "" || p.asked != p.canonical {
		// One put or delete with records at a time: a failed put removing
		// the record it created cannot remove it under a concurrent put of
		// the same manifest that succeeds.
		h.recMu.Lock()
		defer h.recMu.Unlock()
	}
	undo, err := h.record(rt.name, p)
	if err != nil {
		h.removeRecords(undo)
		h.fail(w, "recording the manifest", err)
		return
	}
	if p.asked != p.canonical {
		r = withPath(r, "/v2/"+rt.name+"/manifests/"+p.canonical.String())
	}
	r.Body = io.NopCloser(bytes.NewReader(p.body))
	r.ContentLength = int64(len(p.body))
	h.next.ServeHTTP(&hookWriter{ResponseWriter: w, hook: func(status int, hd http.Header) {
		if status != http.StatusCreated {
			h.removeRecords(undo)
			return
		}
		if p.subject != "" {
			hd.Set("OCI-Subject", p.subject.String())
		}
		if p.asked != p.canonical {
			hd.Set("Docker-Content-Digest", p.asked.String())
			hd.Set("Location", "/v2/"+rt.name+"/manifests/"+p.asked.String())
		}
	}}, r)
}

// removeRecords removes the records of a failed put.
func (h *ociHandler) removeRecords(files []string) {
	for _, f := range files {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			h.log.Warn("registry: removing the record of a failed put", "err", err)
		}
	}
}

// readManifestPut reads and checks a manifest put; false means it answered.
func (h *ociHandler) readManifestPut(w http.ResponseWriter, r *http.Request, rt route) (manifestPut, bool) {
	var p manifestPut
	body, err := io.ReadAll(io.LimitReader(r.Body, maxManifestBytes+1))
	if err != nil {
		writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID", "reading the manifest: "+err.Error())
		return p, false
	}
	if len(body) > maxManifestBytes {
		writeRegistryError(w, http.StatusRequestEntityTooLarge, "SIZE_INVALID", "manifest too large")
		return p, false
	}
	p.body = body
	p.canonical = digest.SHA256.FromBytes(body)
	p.asked = p.canonical
	if strings.Contains(rt.ref, ":") {
		d, err := digest.Parse(rt.ref)
		if err != nil {
			writeRegistryError(w, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("manifest digest %q: %v", rt.ref, err))
			return p, false
		}
		if d.Algorithm().FromBytes(body) != d {
			writeRegistryError(w, http.StatusBadRequest, "DIGEST_INVALID", "the manifest does not match digest "+d.String())
			return p, false
		}
		p.asked = d
	}
	if t := bytes.TrimSpace(body); len(t) == 0 || t[0] != '{' {
		writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID", "manifest is not a JSON object")
		return p, false
	}
	if err := json.Unmarshal(body, &p.doc); err != nil {
		writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID", "manifest is not JSON: "+err.Error())
		return p, false
	}
	if p.doc.SchemaVersion != 2 {
		// distribution answers an unknown version with a 500.
		writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID", fmt.Sprintf("manifest schemaVersion %d is not supported (only 2)", p.doc.SchemaVersion))
		return p, false
	}
	p.mediaType = p.doc.MediaType
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (p.doc.MediaType != "" && mt != p.doc.MediaType) {
			writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID",
				fmt.Sprintf("manifest mediaType %q differs from Content-Type %q", p.doc.MediaType, ct))
			return p, false
		}
		p.mediaType = mt
	}
	if err := descriptorDigests(&p.doc); err != nil {
		writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID", err.Error())
		return p, false
	}
	if err := foreignURLs(&p.doc); err != nil {
		writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID", err.Error())
		return p, false
	}
	if p.doc.Subject != nil {
		if p.subject, err = digest.Parse(p.doc.Subject.Digest); err != nil {
			writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID", fmt.Sprintf("subject digest %q: %v", p.doc.Subject.Digest, err))
			return p, false
		}
	}
	return p, true
}

// record writes what ociHandler keeps about a put before distribution
// stores it: the referrer record of a manifest with a subject, the alias of
// one put by another digest than sha256. A put that then fails leaves
// records that reads skip (the manifest does not exist) and that the caller
// removes (undo: the files this put created); a put that succeeds is never
// without them.
func (h *ociHandler) record(name string, p manifestPut) (undo []string, err error) {
	if p.subject != "" {
		artifactType := p.doc.ArtifactType
		if artifactType == "" && p.doc.Config != nil {
			artifactType = p.doc.Config.MediaType
		}
		created, err := h.addReferrer(name, p.subject, descriptor{
			MediaType: p.mediaType, Digest: p.asked.String(), Size: int64(len(p.body)),
			ArtifactType: artifactType, Annotations: p.doc.Annotations,
		})
		if err != nil {
			return nil, err
		}
		if created {
			undo = append(undo, h.referrerPath(name, p.subject, p.asked))
		}
	}
	if p.asked != p.canonical {
		created, err := h.setAlias(name, p.asked, p.canonical)
		if err != nil {
			return undo, err
		}
		if created {
			undo = append(undo, h.aliasPath(name, p.asked))
		}
	}
	return undo, nil
}

// childrenExist checks the children of an index put; false means it answered.
func (h *ociHandler) childrenExist(w http.ResponseWriter, r *http.Request, rt route, doc *manifestDoc) bool {
	if len(doc.Manifests) > maxIndexChildren {
		writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID",
			fmt.Sprintf("index has %d manifests, more than the %d allowed", len(doc.Manifests), maxIndexChildren))
		return false
	}
	for _, c := range doc.Manifests {
		d, err := digest.Parse(c.Digest)
		if err != nil {
			writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID", fmt.Sprintf("index child digest %q: %v", c.Digest, err))
			return false
		}
		if c.Platform != nil && (c.Platform.OS != h.os || c.Platform.Architecture != h.arch) {
			continue // another platform's child may be absent (pull-through keeps only ours)
		}
		status, _ := h.probe(r, http.MethodHead, rt.name, d, nil)
		switch status {
		case http.StatusOK:
		case http.StatusNotFound:
			writeRegistryError(w, http.StatusBadRequest, "MANIFEST_BLOB_UNKNOWN", "index child "+d.String()+" is not in "+rt.name)
			return false
		default:
			writeRegistryError(w, http.StatusServiceUnavailable, "UNAVAILABLE",
				fmt.Sprintf("checking index child %s: status %d", d, status))
			return false
		}
	}
	return true
}

// probe asks the registry (through h, so that aliases resolve) for manifest
// d of repository name, keeping up to max bytes of the body when body is not nil.
func (h *ociHandler) probe(r *http.Request, method, name string, d digest.Digest, body *bytes.Buffer) (int, http.Header) {
	req, err := http.NewRequestWithContext(r.Context(), method, "/v2/"+name+"/manifests/"+d.String(), nil)
	if err != nil {
		return http.StatusInternalServerError, nil
	}
	req.Host = r.Host
	req.Header.Set("Accept", manifestMediaTypes)
	rec := &headRecorder{header: http.Header{}, body: body, max: maxProbeManifestBytes}
	h.manifest(rec, req, route{name: name, kind: "manifests", ref: d.String()})
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	return rec.status, rec.header
}

// manifest serves GET, HEAD and DELETE of a manifest, resolving digest aliases.
func (h *ociHandler) manifest(w http.ResponseWriter, r *http.Request, rt route) {
	d, err := digest.Parse(rt.ref)
	if err != nil {
		h.next.ServeHTTP(w, r) // by tag
		return
	}
	target := d
	if d.Algorithm() != digest.SHA256 {
		c, err := h.alias(rt.name, d)
		if errors.Is(err, fs.ErrNotExist) {
			writeRegistryError(w, http.StatusNotFound, "MANIFEST_UNKNOWN", "manifest unknown: "+d.String())
			return
		}
		if err != nil {
			h.fail(w, "reading digest alias", err)
			return
		}
		target = c
		r = withPath(r, "/v2/"+rt.name+"/manifests/"+c.String())
		w = asDigest(w, d, 0, "")
	}
	if r.Method != http.MethodDelete {
		h.next.ServeHTTP(w, r)
		return
	}
	// Before a delete, find the manifest's subject, to drop its referrer record.
	var buf bytes.Buffer
	var subject digest.Digest
	if status, _ := h.probe(r, http.MethodGet, rt.name, target, &buf); status == http.StatusOK {
		var doc manifestDoc
		if json.Unmarshal(buf.Bytes(), &doc) == nil && doc.Subject != nil {
			subject, _ = digest.Parse(doc.Subject.Digest)
		}
	}
	h.recMu.Lock()
	defer h.recMu.Unlock()
	rec := &statusWriter{ResponseWriter: w}
	h.next.ServeHTTP(rec, r)
	if rec.status != http.StatusAccepted {
		return
	}
	if d != target {
		if err := os.Remove(h.aliasPath(rt.name, d)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			h.log.Warn("registry: removing digest alias", "err", err)
		}
	}
	if subject != "" {
		for _, ref := range []digest.Digest{d, target} {
			if err := os.Remove(h.referrerPath(rt.name, subject, ref)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				h.log.Warn("registry: removing referrer record", "err", err)
			}
		}
	}
}

func (h *ociHandler) aliasPath(name string, d digest.Digest) string {
	return filepath.Join(h.dir, "digests", filepath.FromSlash(name), string(d.Algorithm()), d.Encoded())
}

// setAlias records that d (not sha256) names the manifest canonical;
// created says whether the record is new.
func (h *ociHandler) setAlias(name string, d, canonical digest.Digest) (created bool, err error) {
	p := h.aliasPath(name, d)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return false, err
	}
	_, err = os.Stat(p)
	return err != nil, atomicfile.WriteFile(p, []byte(canonical.String()), 0o600)
}

func (h *ociHandler) alias(name string, d digest.Digest) (digest.Digest, error) {
	b, err := os.ReadFile(h.aliasPath(name, d))
	if err != nil {
		return "", err
	}
	c, err := digest.Parse(strings.TrimSpace(string(b)))
	if err != nil || c.Algorithm() != digest.SHA256 {
		return "", fmt.Errorf("digest alias of %s is malformed", d)
	}
	return c, nil
}

func (h *ociHandler) fail(w http.ResponseWriter, what string, err error) {
	if errors.Is(err, errTooMany) {
		writeRegistryError(w, http.StatusForbidden, "DENIED", err.Error())
		return
	}
	h.log.Error("registry: "+what, "err", err)
	writeRegistryError(w, http.StatusInternalServerError, "UNKNOWN", what+" failed")
}

var (
	_ http.Handler        = (*ociHandler)(nil)
	_ http.Handler        = (*recoverHandler)(nil)
	_ http.ResponseWriter = (*hookWriter)(nil)
	_ http.ResponseWriter = (*statusWriter)(nil)
	_ http.ResponseWriter = (*pipeResponse)(nil)
)
