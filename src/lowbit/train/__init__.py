"""Training: QLoRA (LoRA adapters over a frozen NF4 base), with more to come (QAT, FP8)."""
