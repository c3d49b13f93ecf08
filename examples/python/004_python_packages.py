"""Seed 004: Python packages from a list or a requirements file."""
from chalkcompute import Image

img = Image.debian_slim().pip_install(["torch==2.3.0", "transformers"])
print(img.spec_json())

# Or from a requirements file
img = Image.debian_slim().pip_install_from_requirements("requirements.txt")
print(img.spec_json())
