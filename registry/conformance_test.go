package registry

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
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
// The counts (the suite's own) are logged; every test must pass except the
// mount without a source repository, which we decline (see below).
//
// It runs against the registry as chalkd configures it, immutable tags
// included: the suite reuses tag names only after deleting them (the
// content management workflow), which immutability allows.
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

	r := newTestRegistry(t, Config{}) // chalkd's configuration: immutable tags
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
		"OCI_API_BLOBS_UPLOAD_CANCEL=true", // off by default in the suite
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

	counts, leaves, err := parseConformanceReport(string(out))
	if err != nil {
		t.Fatalf("conformance suite (%v): %v\n%s", runErr, err, out)
	}
	t.Logf("OCI distribution-spec v1.1 conformance: %d of %d pass, %d fail, %d error, %d skip, %d disabled (%.1f s)",
		counts["Pass"], counts["Total"], counts["FAIL"], counts["Error"], counts["Skip"], counts["Disabled"], elapsed.Seconds())
	for _, l := range leaves {
		switch {
		case l.status == "Pass":
		case l.status == "Skip" && strings.HasSuffix(l.name, "/blob-mount-anonymous"):
			// A mount without a source repository: declined on purpose
			// (docs/SECURITY.md); the spec's answer, an upload session, is
			// what the suite falls back to.
		default:
			t.Errorf("conformance: %s: %s%s", l.name, l.status, l.detail)
		}
	}
	if counts["FAIL"] != 0 || counts["Error"] != 0 || counts["Disabled"] != 0 || counts["Pass"] == 0 {
		t.Errorf("conformance counts: %v", counts)
	}
	if runErr != nil && counts["FAIL"] == 0 && counts["Error"] == 0 {
		t.Errorf("conformance suite: %v\n%s", runErr, out)
	}
}

type conformanceLeaf struct{ name, status, detail string }

var (
	conformanceCount = regexp.MustCompile(`^\s+(Disabled|Skip|Pass|FAIL|Error|Total)\.+:\s+(\d+)$`)
	conformanceTest  = regexp.MustCompile(`^(\s*)(OCI Conformance Test/.*): (Disabled|Skip|Pass|FAIL|Error|Unknown)$`)
)

// parseConformanceReport reads the suite's report: its own counts and the
// status of each test that has no sub-tests, with its error lines.
func parseConformanceReport(out string) (map[string]int, []conformanceLeaf, error) {
	counts := map[string]int{}
	var leaves []conformanceLeaf
	lines := strings.Split(out, "\n")
	for i, line := range lines {
		if m := conformanceCount.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[2])
			counts[m[1]] = n
			continue
		}
		m := conformanceTest.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		if i+1 < len(lines) {
			if next := conformanceTest.FindStringSubmatch(lines[i+1]); next != nil && len(next[1]) > len(m[1]) {
				continue // has sub-tests
			}
		}
		l := conformanceLeaf{name: m[2], status: m[3]}
		for j := i + 1; j < len(lines) && strings.HasPrefix(strings.TrimSpace(lines[j]), "- "); j++ {
			l.detail += "\n\t" + strings.TrimSpace(lines[j])
		}
		leaves = append(leaves, l)
	}
	if _, ok := counts["Total"]; !ok || len(leaves) == 0 {
		return nil, nil, errors.New("no counts in the suite's report")
	}
	return counts, leaves, nil
}
