"""Matmul paths chosen by device: torch's integer kernels where they run, exact references elsewhere."""
