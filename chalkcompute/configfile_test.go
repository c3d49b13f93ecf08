package chalkcompute

import (
	"os"
	"path/filepath"
	"testing"
)

// TestWriteConfigFile: what chalkd writes (WriteConfigFile) is what the SDK and
// CLI read (ReadConfig via CHALK_CONFIG), mode 0600 in a 0700 directory.
func TestWriteConfigFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "chalk", "config.json")
	t.Setenv("CHALK_CONFIG", p)
	if err := WriteConfigFile(p, &FileConfig{APIURL: "unix:///run/chalk/chalkd.sock", Token: "ck_x"}); err != nil {
		t.Fatal(err)
	}
	fc, err := ReadConfig()
	if err != nil || fc.APIURL != "unix:///run/chalk/chalkd.sock" || fc.Token != "ck_x" {
		t.Fatalf("%+v %v", fc, err)
	}
	st, _ := os.Stat(p)
	dst, _ := os.Stat(filepath.Dir(p))
	if st.Mode().Perm() != 0o600 || dst.Mode().Perm() != 0o700 {
		t.Fatalf("modes %v %v", st.Mode().Perm(), dst.Mode().Perm())
	}
	fc.Keys = map[string]string{"a": "ck_a"}
	if err := WriteConfig(fc); err != nil {
		t.Fatal(err)
	}
	if fc, _ = ReadConfig(); fc.Keys["a"] != "ck_a" {
		t.Fatalf("after WriteConfig: %+v", fc)
	}
}
