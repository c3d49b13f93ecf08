package daemon

import (
	"log/slog"
	"os"
	"time"

	"github.com/chalkcompute/chalkcompute/noderpc"
)

// Test hooks of node certificate renewal (noderpc/rotate.go,
// noderpc/certcheck.go), read from the environment of chalkd; for tests
// only, each logged as such when set.
const (
	// CertGraceEnv sets the control plane's grace for a superseded node
	// certificate (a Go duration; default noderpc.DefaultCertGrace).
	CertGraceEnv = "CHALK_TEST_CERT_GRACE"
	// RenewNowEnv names a file: while it exists, a node checks every
	// 100 ms and renews its certificate (then removes the file), due or
	// not.
	RenewNowEnv = "CHALK_TEST_RENEW_NOW"
	// NodeCertTTLEnv sets how long the node certificates the control
	// plane issues last (a Go duration; default a year).
	NodeCertTTLEnv = "CHALK_TEST_NODE_CERT_TTL"
)

// nodeCertTTL is how long the control plane's node certificates last (0:
// the default).
func nodeCertTTL(log *slog.Logger) time.Duration {
	v := os.Getenv(NodeCertTTLEnv)
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		log.Error("test hook: ignored (want a positive duration)", "env", NodeCertTTLEnv, "value", v)
		return 0
	}
	log.Warn("test hook: node certificates issued for a lifetime other than the default", "env", NodeCertTTLEnv, "ttl", d)
	return d
}

// certGrace is the control plane's grace for superseded node certificates.
func certGrace(log *slog.Logger) time.Duration {
	v := os.Getenv(CertGraceEnv)
	if v == "" {
		return noderpc.DefaultCertGrace
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		log.Error("test hook: ignored (want a positive duration)", "env", CertGraceEnv, "value", v)
		return noderpc.DefaultCertGrace
	}
	log.Warn("test hook: superseded node certificates accepted for a grace other than the default", "env", CertGraceEnv, "grace", d)
	return d
}

// renewSchedule is how often a node checks whether its certificate is
// due, and when it is (nil: a third of its life left).
func renewSchedule(log *slog.Logger) (time.Duration, func(time.Time) bool) {
	file := os.Getenv(RenewNowEnv)
	if file == "" {
		return time.Hour, nil
	}
	log.Warn("test hook: the node certificate is renewed whenever a file exists", "env", RenewNowEnv, "file", file)
	return 100 * time.Millisecond, func(time.Time) bool {
		if _, err := os.Stat(file); err != nil {
			return false
		}
		_ = os.Remove(file)
		return true
	}
}
