"""Kernel sets: the hot loops of every layer, one set per backend.

- `reference.ReferenceKernels`: the definition of every kernel, NumPy/CuPy array code.
- `cpu.CPUKernels`: numba overrides (with `cpu_conv`, the direct convolution, whose loops are
  generated into `cpu_conv_generated` by `cpu_conv_codegen`).
- `gpu.GPUKernels`: CUDA overrides through CuPy (imported only when CuPy is).

Nothing is imported here: importing a set compiles or loads its kernels, so the backend imports
the one it needs.
"""
