#!/bin/sh
# Seed 004: pre-warm an image on the node ahead of sandbox creation.
# Usage: ./004_warm.sh <image-hash>   (e.g. the image_hash a build printed)
set -e
chalk compute image warm --image "$1"
