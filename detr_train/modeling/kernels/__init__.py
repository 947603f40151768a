"""Fused GPU kernels that replace slow or fragile pieces of transformers' models.

Submodules import torch/Triton themselves; importing this package costs nothing.
"""
