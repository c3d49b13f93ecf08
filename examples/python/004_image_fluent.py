"""Seed 004: the fluent, immutable Image API (3.12 -> 3.11: the only seeded Python base here)."""
from chalkcompute import Image

img = (
    Image.debian_slim("3.11")
    .pip_install(["requests", "pandas>=2.0"])
    .run_commands("apt-get update && apt-get install -y git curl")
    .workdir("/app")
    .env({"PROJECT_ROOT": "/app"})
)

print(img.spec_json())
