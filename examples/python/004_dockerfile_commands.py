"""Seed 004: raw Dockerfile instructions."""
from chalkcompute import Image

img = Image.debian_slim().dockerfile_commands([
    "EXPOSE 8080",
    "RUN useradd -m worker",
    "USER worker",
])

print(img.spec_json())
