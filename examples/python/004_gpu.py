"""Seed 004: GPU workloads start from NVIDIA's pre-built images."""
from chalkcompute import Image

# PyTorch with CUDA — starts from NVIDIA's pre-built image
img = (
    Image.base("nvcr.io/nvidia/pytorch:24.01-py3")
    .pip_install(["transformers", "accelerate"])
)
print(img.spec_json())

# TensorFlow
img = Image.base("nvcr.io/nvidia/tensorflow:24.01-tf2-py3")
print(img.spec_json())
