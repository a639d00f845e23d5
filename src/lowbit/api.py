"""The Python API, mirroring the CLI:

    model, tok = lowbit.load_model("path/to/hf-model")          # None: the bundled model
    lowbit.quantize(model, lowbit.RTN(bits=4, group_size=128), tokenizer=tok)
    lowbit.save(model, "out/model-int4", tokenizer=tok);  model, tok = lowbit.load("out/model-int4")
    lowbit.export(model, "out/model.gguf", format="gguf", tokenizer=tok)
"""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io import get_exporter, get_importer, targets
from lowbit.io.native import is_native
from lowbit.io.native import load as load_native
from lowbit.io.native import save
from lowbit.pipeline.arch import describe
from lowbit.pipeline.loading import load_model as load_hf_model
from lowbit.pipeline.runner import planned_weights, quantize_model
from lowbit.pipeline.samples import CalibrationSet, build_calibration, check_context, context_length, resolve_mode

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 256


def load_model(path=None, trust_remote_code: bool = False):
    """(model, tokenizer) from a HF model folder, a lowbit-quantised folder, a .gguf file, or None
    (the bundled model)."""
    if path is not None and Path(path).is_dir() and is_native(path):
        return load_native(path)
    if path is not None and Path(path).is_file() and Path(path).suffix == ".gguf":
        return get_importer("gguf")(path)
    importer = _quantized_folder_format(path)
    if importer is not None:  # a GPTQ/AWQ/bnb/compressed-tensors/AQLM folder: read by lowbit, no optimum needed
        return get_importer(importer)(path)
    return load_hf_model(path, torch.float32, trust_remote_code)


# quantization_config's quant_method -> the importer that reads the folder
QUANT_METHOD_IMPORTERS = {"gptq": "gptq", "awq": "awq", "bitsandbytes": "bnb", "compressed-tensors": "compressed-tensors",
                          "aqlm": "aqlm"}


def _quantized_folder_format(path) -> str | None:
    import json

    config = Path(path) / "config.json" if path is not None else None
    if config is None or not config.is_file():
        return None
    try:
        qc = json.loads(config.read_text()).get("quantization_config")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None  # the ordinary loader reports a bad config.json in one line
    return QUANT_METHOD_IMPORTERS.get(qc.get("quant_method")) if isinstance(qc, dict) else None


load = load_model


def default_seq_len(model) -> int:
    return min(context_length(model) or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)


def check_target(model, config, target: str) -> str:
    """The format in which `target` ("vllm", "llama.cpp", "transformers") can serve `model` quantised with
    `config` (a config, Recipe or short name), checked on shapes and schemes before any work; a
    LowbitError with one line per offending layer otherwise."""
    weights, fused = planned_weights(model, config)
    family = getattr(getattr(model, "config", None), "model_type", None)
    fmt, problems = targets.check_target(target, weights, fused, family=family)
    if problems:
        raise LowbitError(f"{target} cannot serve this recipe:\n  " + "\n  ".join(targets.shown(problems)))
    return fmt


def quantize(model, config, calibration=None, tokenizer=None, n_samples: int = DEFAULT_SAMPLES,
             seq_len: int | None = None, seed: int = 0, batch_size: int = 8, progress: bool = True,
             target: str | None = None, calibration_mode: str = "auto", distributed: bool = False):
    """Quantise `model` in place with a method config, a Recipe or a short name ("rtn-int4-g128").

    calibration: token ids [n, L] (windows), a CalibrationSet, or texts / conversations / a path / None
    (the bundled calibration text), tokenised with `tokenizer` by calibration_mode: "windows" (n_samples
    seeded windows of seq_len tokens of one stream), "samples" (n_samples documents, each its own
    sequence with the tokenizer's special tokens or chat template, at most seq_len tokens, padding
    masked) or "auto" (samples for encoders and conversations, windows otherwise). The set used is
    described in `model.lowbit_calibration` (mode, samples, real tokens).
    target: "vllm", "llama.cpp" or "transformers": refuse, before any work, a recipe that engine cannot serve.
    distributed: share the calibration batches and the solves among the ranks of the initialised
    torch.distributed process group (run under torchrun; every rank makes the same call and ends with the
    same model, equal bit for bit to one process's at equal CPU threads per process; save on rank 0).
    """
    if target is not None:
        check_target(model, config, target)
    calib = calibration_for(model, config, calibration, tokenizer, n_samples, seq_len, seed, calibration_mode)
    return quantize_model(model, config, calib, batch_size=batch_size, progress=progress, distributed=distributed)


def calibration_for(model, config, calibration=None, tokenizer=None, n_samples: int = DEFAULT_SAMPLES,
                    seq_len: int | None = None, seed: int = 0, calibration_mode: str = "auto"):
    """The token ids (or CalibrationSet) `quantize` runs for these arguments; None when there is no text."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise LowbitError(f"calibration ids must be an integer tensor [n_samples, seq_len], got "
                              f"{tuple(calibration.shape)}")
        return calibration
    if isinstance(calibration, CalibrationSet):
        return calibration
    if tokenizer is None and calibration is None:
        _refuse_uncalibrated(config)
        return None  # no tokenizer: calibration-free methods still work, the report says no tokens were seen
    check_context(model, seq_len)
    mode = resolve_mode(calibration_mode, describe(model).causal, calibration)
    return build_calibration(tokenizer, calibration, n_samples, seq_len or default_seq_len(model), seed, mode)


def quantize_folder(path, config, out, calibration=None, use_tokenizer: bool = True, n_samples: int = DEFAULT_SAMPLES,
                    seq_len: int | None = None, seed: int = 0, batch_size: int = 8, progress: bool = True,
                    calibration_mode: str = "auto"):
    """Quantise the Hugging Face folder `path` into a native folder at `out`, streaming: one decoder block's
    weights in memory at a time, and an interrupted run resumes when called again with the same arguments.
    The folder equals `save(quantize(load_model(path), ...), out)` byte for byte. use_tokenizer: calibrate
    with the folder's tokenizer (False: only with `calibration` ids). Returns the (weightless) model."""
    from lowbit.io.streamed import quantize_streamed
    from lowbit.pipeline.loading import load_tokenizer, resolve_model_path
    from lowbit.pipeline.streaming import skeleton

    folder = resolve_model_path(path)
    model, shards = skeleton(folder)
    tokenizer = load_tokenizer(folder)
    calib = calibration_for(model, config, calibration, tokenizer if use_tokenizer else None, n_samples, seq_len,
                            seed, calibration_mode)
    return quantize_streamed(model, shards, config, calib, out, tokenizer, batch_size, progress)


def _refuse_uncalibrated(config) -> None:
    """A method that needs calibration activations, given none, is an error (never a silent RTN)."""
    from lowbit.methods import parse_method
    from lowbit.pipeline.calibration import needs_calibration

    resolved = parse_method(config) if isinstance(config, str) else config
    if needs_calibration(resolved):
        raise LowbitError("this method needs calibration activations and there is no tokenizer to make them: add "
                          "the tokenizer files to the model folder, or pass calibration token ids")


def export(model, out, format: str, tokenizer=None, requantize: bool = False, **options):
    """Write a (quantised) model in a serving format: "gguf", "gptq", "awq", "bnb", "compressed-tensors",
    "aqlm". Weights the format
    holds exactly are copied; others are refused unless requantize=True. Returns the written path."""
    return get_exporter(format).export(model, out, tokenizer=tokenizer, requantize=requantize, **options)


__all__ = ["load_model", "load", "quantize", "save", "export", "check_target"]
