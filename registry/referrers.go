package registry

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/chalkcompute/chalkcompute/atomicfile"
)

// The referrers API (oci.go): the record ociHandler keeps of which
// manifests refer to which subject, and the list it answers from it.

// descriptor is an entry of a referrers list.
type descriptor struct {
	MediaType    string            `json:"mediaType"`
	Digest       string            `json:"digest"`
	Size         int64             `json:"size"`
	ArtifactType string            `json:"artifactType,omitempty"`
	Annotations  map[string]string `json:"annotations,omitempty"`
}

// referrers serves GET /v2/<name>/referrers/<digest>.
func (h *ociHandler) referrers(w http.ResponseWriter, r *http.Request, rt route) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeRegistryError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "the referrers API is read-only")
		return
	}
	if _, err := reference.WithName(rt.name); err != nil {
		writeRegistryError(w, http.StatusBadRequest, "NAME_INVALID", fmt.Sprintf("repository name %q is invalid", rt.name))
		return
	}
	subject, err := digest.Parse(rt.ref)
	if err != nil {
		writeRegistryError(w, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("digest %q: %v", rt.ref, err))
		return
	}
	list, err := h.listReferrers(r, rt.name, subject)
	if err != nil {
		h.fail(w, "listing referrers", err)
		return
	}
	if at := r.URL.Query().Get("artifactType"); at != "" {
		list = slices.DeleteFunc(list, func(d descriptor) bool { return d.ArtifactType != at })
		w.Header().Set("OCI-Filters-Applied", "artifactType")
	}
	b, err := json.Marshal(struct {
		SchemaVersion int          `json:"schemaVersion"`
		MediaType     string       `json:"mediaType"`
		Manifests     []descriptor `json:"manifests"`
	}{2, mediaTypeOCIIndex, list})
	if err != nil {
		h.fail(w, "listing referrers", err)
		return
	}
	w.Header().Set("Content-Type", mediaTypeOCIIndex)
	w.Header().Set("Content-Length", fmt.Sprint(len(b)))
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(b)
	}
}

// listReferrers returns the recorded referrers of subject whose manifest
// exists, sorted by digest.
func (h *ociHandler) listReferrers(r *http.Request, name string, subject digest.Digest) ([]descriptor, error) {
	entries, err := os.ReadDir(h.subjectDir(name, subject))
	if errors.Is(err, fs.ErrNotExist) {
		return []descriptor{}, nil
	}
	if err != nil {
		return nil, err
	}
	list := []descriptor{}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(h.subjectDir(name, subject), e.Name()))
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed meanwhile
		}
		if err != nil {
			return nil, err
		}
		var d descriptor
		if err := json.Unmarshal(b, &d); err != nil {
			h.log.Warn("registry: malformed referrer record", "file", e.Name(), "err", err)
			continue
		}
		dd, err := digest.Parse(d.Digest)
		if err != nil {
			continue
		}
		if status, _ := h.probe(r, http.MethodHead, name, dd, nil); status != http.StatusOK {
			continue // its put failed or it was deleted
		}
		list = append(list, d)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Digest < list[j].Digest })
	return list, nil
}

func (h *ociHandler) subjectDir(name string, subject digest.Digest) string {
	return filepath.Join(h.dir, "referrers", filepath.FromSlash(name), string(subject.Algorithm()), subject.Encoded())
}

func (h *ociHandler) referrerPath(name string, subject, ref digest.Digest) string {
	return filepath.Join(h.subjectDir(name, subject), string(ref.Algorithm())+"-"+ref.Encoded()+".json")
}

// addReferrer records d as a referrer of subject; created says whether the
// record is new.
func (h *ociHandler) addReferrer(name string, subject digest.Digest, d descriptor) (created bool, err error) {
	ref, err := digest.Parse(d.Digest)
	if err != nil {
		return false, err
	}
	dir := h.subjectDir(name, subject)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, err
	}
	p := h.referrerPath(name, subject, ref)
	_, err = os.Stat(p)
	created = err != nil
	if created {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return false, err
		}
		if int64(len(entries)) >= h.maxReferrers.Load() {
			return false, fmt.Errorf("subject %s already has %d referrers, the most allowed: %w", subject, len(entries), errTooMany)
		}
	}
	b, err := json.Marshal(d)
	if err != nil {
		return false, err
	}
	return created, atomicfile.WriteFile(p, b, 0o600)
}

var errTooMany = errors.New("too many")
