"""Fused kernels (Triton) with their plain-PyTorch twins; each op falls back to its twin where
there is no CUDA device or no Triton, so CPU installs run the same code path."""
