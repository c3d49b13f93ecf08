"""Seed 004: local files by mount (default) or copy."""
from chalkcompute import Image

# Volume mount (default) — file is uploaded at sandbox start, not baked into the image.
# Faster iteration when the file changes frequently.
img = Image.debian_slim().add_local_file("app.py", "/app/app.py")
print(img.spec_json())

# Copy — inlines the file contents into the image spec.
# Better for small, stable files that should be part of the cached image.
img = Image.debian_slim().add_local_file(
    "app.py", "/app/app.py", strategy="copy"
)
print(img.spec_json())

# Entire directories work the same way
img = Image.debian_slim().add_local_dir("./src", "/app/src")
print(img.spec_json())
