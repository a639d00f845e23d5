"""Evaluation: perplexity, output fidelity, memory footprint, speed, and the comparison report.

The numerics take a model and token ids and know nothing of how the model was quantised.
"""
from lowbit.eval.compare import compare, parse_methods
from lowbit.eval.evaluate import evaluate
from lowbit.eval.fidelity import FidelityResult, Reference, build_reference, fidelity
from lowbit.eval.memory import MemoryReport, model_memory
from lowbit.eval.perplexity import PerplexityResult, perplexity
from lowbit.eval.speed import SpeedResult, measure_speed
from lowbit.eval.windows import Windows, split_windows

__all__ = ["perplexity", "fidelity", "build_reference", "model_memory", "measure_speed", "evaluate", "compare",
           "parse_methods", "PerplexityResult", "FidelityResult", "Reference", "MemoryReport", "SpeedResult",
           "Windows", "split_windows"]
