"""Model plumbing: architectures as data, block-by-block calibration, folding, loading."""
