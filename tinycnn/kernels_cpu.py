"""Numba CPU kernels (filled in below)."""
