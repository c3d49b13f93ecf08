package registry

import (
	"encoding/xml"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestOCIConformance runs the OCI distribution-spec v1.1 conformance suite
// (github.com/opencontainers/distribution-spec/conformance, a `tool` of this
// module, pinned in go.mod) against an embedded registry, as a built binary
// talking HTTP to the registry with its real basic auth: every request carries
// the push credential, anonymous requests are refused (the suite follows the
// 401 challenge). All four workflows run: pull, push, content discovery (tag
// list, referrers) and content management (tag, manifest and blob delete),
// with every kind of test data the suite has (sha512, nested indexes,
// artifacts, subjects, ...).
//
// It runs against a registry with mutable tags (Config.MutableTags): the
// suite pushes different manifests under the same tag, which the default
// (immutable tags) refuses by design. docs/SECURITY.md says why our default
// differs; TestTagsImmutable guards the default.
func TestOCIConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the conformance suite (about 20 s)")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build the conformance suite: %v", err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "conformance")
	build := exec.CommandContext(t.Context(), goBin, "build", "-o", bin, "github.com/opencontainers/distribution-spec/conformance")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the conformance suite: %v\n%s", err, out)
	}

	r := newTestRegistry(t, Config{MutableTags: true})
	push := r.Credentials().Push
	results := filepath.Join(dir, "results")
	env := []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + dir,
		"OCI_CONFIGURATION=" + filepath.Join(dir, "none.yaml"), // no config file: env only
		"OCI_VERSION=1.1",
		"OCI_REGISTRY=" + r.Addr(),
		"OCI_TLS=disabled",
		"OCI_USERNAME=" + push.Username,
		"OCI_PASSWORD=" + push.Password,
		"OCI_RESULTS_DIR=" + results,
		"OCI_LOG=error",
		"OCI_REPO1=conformance/repo1",
		"OCI_REPO2=conformance/repo2",
		// The four workflows, all on (they are the defaults; spelled out
		// so that a change of the suite's defaults cannot switch one off).
		"OCI_API_PULL=true",
		"OCI_API_PUSH=true",
		"OCI_API_TAGS_LIST=true", // content discovery
		"OCI_API_REFERRER=true",  // content discovery
		"OCI_API_TAGS_DELETE=true",
		"OCI_API_MANIFESTS_DELETE=true",
		"OCI_API_BLOBS_DELETE=true",
		"OCI_DATA_SHA512=true",
		"OCI_DATA_INDEX_LIST=true",
	}
	if err := os.WriteFile(filepath.Join(dir, "none.yaml"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), bin)
	cmd.Env = env
	cmd.Dir = dir
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	out, runErr := cmd.CombinedOutput()
	elapsed := time.Since(start)

	b, err := os.ReadFile(filepath.Join(results, "junit.xml"))
	if err != nil {
		t.Fatalf("no results from the conformance suite (%v): %v\n%s", runErr, err, out)
	}
	var suites struct {
		Suites []struct {
			Cases []struct {
				Name   string `xml:"name,attr"`
				Status string `xml:"status,attr"`
				Out    string `xml:"system-out"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(b, &suites); err != nil {
		t.Fatalf("junit.xml: %v", err)
	}
	counts := map[string]int{}
	var failed []string
	total := 0
	for _, s := range suites.Suites {
		for _, c := range s.Cases {
			total++
			counts[c.Status]++
			if c.Status != "passed" && c.Status != "skipped" {
				failed = append(failed, c.Name+": "+strings.TrimSpace(c.Out))
			}
		}
	}
	t.Logf("OCI distribution-spec conformance: %d of %d passed, %d failed, %d errors, %d skipped (%.1f s)",
		counts["passed"], total, counts["failure"], counts["error"], counts["skipped"], elapsed.Seconds())
	for _, f := range failed {
		t.Errorf("conformance: %s", f)
	}
	if counts["skipped"] != 0 {
		t.Errorf("%d conformance tests skipped: a feature the suite probes is missing\n%s", counts["skipped"], out)
	}
	if total == 0 {
		t.Fatalf("the conformance suite ran no tests\n%s", out)
	}
	if runErr != nil && len(failed) == 0 {
		t.Errorf("conformance suite: %v\n%s", runErr, out)
	}
}
