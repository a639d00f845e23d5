"""Matmul paths: the fused low-bit CPU kernels (fused.py over the C++ in csrc/, built on first use by native.py),
fast dequantisation of packed integer weights (dequant.py), and int8 x int8 matmuls (int8.py)."""
