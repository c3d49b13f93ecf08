package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/chalkcompute/chalkcompute/baseimage"
	"github.com/chalkcompute/chalkcompute/registry"
)

// Base image references the setup seeds. DefaultPython is what
// Image.debian_slim() means without a version on these machines.
const (
	BusyboxRef    = "docker.io/library/busybox:latest"
	DefaultPython = "3.11"
	PythonRef     = "docker.io/library/python:" + DefaultPython + "-slim-bookworm"
)

// RegistryCredentials is the file in the data dir that holds the embedded
// registry's push and pull credentials (0600; registry.Credentials as JSON).
// Sandboxes never see it.
const RegistryCredentials = "registry-auth.json"

// registryConfig is the embedded registry's configuration for dataDir.
func registryConfig(dataDir, addr string, log *slog.Logger) registry.Config {
	return registry.Config{
		RootDir: filepath.Join(dataDir, "registry"), Addr: addr, Logger: log,
		CredentialsFile: filepath.Join(dataDir, RegistryCredentials),
	}
}

// SeedOptions says which base images to seed.
type SeedOptions struct {
	DataDir      string
	RegistryAddr string // where the temporary registry listens (default 127.0.0.1:0)
	Busybox      bool
	Python       bool
	CacheDir     string // Python base layer cache (default DataDir/seed-cache)
	Logger       *slog.Logger
}

// Seed pushes base images into the embedded registry's storage (chalkd must not
// be running on the same data dir). It is idempotent.
func Seed(ctx context.Context, o SeedOptions) error {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.RegistryAddr == "" {
		o.RegistryAddr = "127.0.0.1:0"
	}
	if err := os.MkdirAll(o.DataDir, 0o700); err != nil {
		return err
	}
	reg, err := registry.New(ctx, registryConfig(o.DataDir, o.RegistryAddr, o.Logger))
	if err != nil {
		return err
	}
	defer reg.Close()
	if o.Busybox {
		img, err := baseimage.Busybox(ctx)
		if err != nil {
			return fmt.Errorf("busybox image: %w", err)
		}
		d, err := baseimage.Seed(ctx, reg, BusyboxRef, img)
		if err != nil {
			return err
		}
		o.Logger.Info("seeded", "ref", BusyboxRef, "digest", d)
	}
	if o.Python {
		cache := o.CacheDir
		if cache == "" {
			cache = filepath.Join(o.DataDir, "seed-cache")
		}
		img, err := baseimage.PythonSlim(ctx, cache, o.Logger)
		if err != nil {
			return fmt.Errorf("python base image: %w", err)
		}
		d, err := baseimage.Seed(ctx, reg, PythonRef, img)
		if err != nil {
			return err
		}
		o.Logger.Info("seeded", "ref", PythonRef, "digest", d)
	}
	return nil
}
