"""Seed 004: system packages with run_commands."""
from chalkcompute import Image

img = Image.debian_slim().run_commands(
    "apt-get update && apt-get install -y ffmpeg libsndfile1",
)

print(img.spec_json())
