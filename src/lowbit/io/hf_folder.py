"""Hugging Face model folders, written once for every format: config.json (with a quantization_config),
generation_config.json, the tokenizer, model.safetensors, into a temporary sibling folder renamed into
place only when everything is written; and the tensors outside the quantised modules.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

WEIGHTS_FILE = "model.safetensors"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def float_dtype(dtype: str | None) -> torch.dtype | None:
    """The torch dtype of an exporter's `dtype` option ("fp16", "bf16", "fp32"; None: as held)."""
    if dtype is not None and dtype not in DTYPES:
        raise LowbitError(f"dtype must be one of {', '.join(DTYPES)} or None, got {dtype!r}")
    return DTYPES.get(dtype)


def writing_folder(out):
    """Write into a temporary sibling folder that becomes `out` only when the block completes (removed on
    any error, Ctrl-C or SIGTERM; a full disk is one line)."""
    from lowbit.io.atomic import atomic_output

    return atomic_output(out, folder=True)


def source_name(model: nn.Module) -> str:
    """The name of the model a quantised model came from: the folder it was first loaded from (kept
    through a native save and load, and a GGUF's general.name), else "lowbit-model". Exports name the
    model by it, so the file does not depend on where an intermediate folder was saved."""
    kept = getattr(model, "lowbit_source_name", None)
    if kept:
        return kept
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(path).name or "lowbit-model"


def float_tensors(model: nn.Module, skip: set[str] | dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the modules named in `skip` (the quantised ones), floating-point
    ones cast to `dtype` when given; storage shared by tied weights is written once (loaders re-tie)."""
    inside = tuple(f"{n}." for n in skip)
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if key.startswith(inside):
            continue
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if where in seen:
            continue
        seen.add(where)
        t = t.detach()
        out[key] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous().clone()
    return out


def conv1d_layout(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with the weights of float Linears that were transformers Conv1D (GPT-2's c_attn, c_proj,
    c_fc: `conv1d_to_linear` marks them) transposed: a Hugging Face folder stores them [in, out] as its
    model class reads them, lowbit holds them [out, in]. Its own inverse: import calls it too."""
    out = dict(tensors)
    for name, m in model.named_modules():
        key = f"{name}.weight"
        if getattr(m, "hf_conv1d", False) and type(m) is nn.Linear and key in out:
            out[key] = out[key].T.contiguous()
    return out


def biases(model: nn.Module, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{"<name>.bias": bias} of the named modules that have one, cast to `dtype` when given."""
    out = {}
    for name in names:
        b = getattr(model.get_submodule(name), "bias", None)
        if b is not None:
            b = b.detach()
            out[f"{name}.bias"] = (b.to(dtype) if dtype is not None else b).contiguous().clone()
    return out


def float_linears(model: nn.Module) -> list[str]:
    """The Linears left in full precision (quantised ones are other module types)."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def output_head(model: nn.Module) -> str | None:
    """The name of the module that produces the logits (lm_head), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def block_selection(model: nn.Module, quantized) -> tuple[str, list[list[str]], list[str]]:
    """(the blocks' path, the quantised Linears of each block by their name inside it, the Linears of the
    blocks left in full precision by full name): what a quantization_config must say of the blocks."""
    from lowbit.pipeline.arch import block_list, describe

    path, blocks = block_list(model, describe(model))
    quantized = set(quantized)
    per_block = [[n for n, _ in b.named_modules() if f"{path}.{i}.{n}" in quantized] for i, b in enumerate(blocks)]
    inside = f"{path}."
    return path, per_block, [n for n in float_linears(model) if n.startswith(inside)]


def mixed(items: dict, what: str, value_of, describe=str) -> str | None:
    """None when every item shares value_of(item); else a phrase naming the first that differs from the
    most common value (for layouts that store one value per model)."""
    values = [value_of(v) for v in items.values()]
    common = max(set(values), key=values.count) if values else None
    odd = next((n for n, v in zip(items, values) if v != common), None)
    if odd is None:
        return None
    return (f"the layout holds one {what} per model; {odd} has {describe(value_of(items[odd]))}, most layers "
            f"{describe(common)}")


def one_value(items: dict, layout: str, what: str, value_of):
    """The value every item shares (a layout that stores one per model), or a one-line error."""
    problem = mixed(items, what, value_of)
    if problem:
        raise LowbitError(f"{layout}: {problem}")
    return value_of(next(iter(items.values())))


def empty_model(config, path: Path) -> nn.Module:
    """The transformers model a folder's config describes, built empty (weights loaded afterwards)."""
    import transformers

    archs = getattr(config, "architectures", None)
    if not archs:
        return transformers.AutoModelForCausalLM.from_config(config)
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise LowbitError(f"unknown model class {archs[0]!r} in {Path(path) / 'config.json'}")
    return cls(config)


def model_config(model: nn.Module, quantization_config: dict | None, dtype: torch.dtype | None = None):
    """A copy of the model's transformers config carrying `quantization_config` (None: none)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.quantization_config = quantization_config
    if quantization_config is None:
        del config.quantization_config
    config.architectures = config.architectures or [type(model).__name__]
    if dtype is not None:
        config.torch_dtype = DTYPE_NAMES[dtype]
    return config


def untied_if_head_quantized(model: nn.Module, config):
    """`config` with tie_word_embeddings off when the output head is held quantised: the folder's head is its
    own tensors, not the embedding (transformers would otherwise tie a float weight onto the quantised
    module, or fail to find one: aqlm's QuantizedLinear has none)."""
    head = output_head(model)
    if head is not None and getattr(config, "tie_word_embeddings", False) and \
            callable(getattr(model.get_submodule(head), "quantized", None)):
        config.tie_word_embeddings = False
    return config


def read_generation_config(model: nn.Module, path) -> None:
    """Give a model built from its config alone the folder's generation_config.json (sampling settings that
    transformers' generate and vLLM read), so that a save or export writes the folder's own, not defaults."""
    from transformers import GenerationConfig

    if not (Path(path) / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:   # values transformers refuses (the JSON was checked on loading)
        raise LowbitError(f"cannot read {Path(path) / 'generation_config.json'}: {str(e).splitlines()[0]}") from e


def write_metadata(tmp: Path, model: nn.Module, config, tokenizer=None) -> None:
    """config.json, generation_config.json (when the model has one) and the tokenizer files."""
    config.save_pretrained(tmp)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def write_hf_folder(out, model: nn.Module, tensors: dict[str, torch.Tensor], tokenizer=None,
                    quantization_config: dict | None = None, dtype: torch.dtype | None = None,
                    extra_json: dict[str, dict] | None = None) -> Path:
    """A complete model folder at `out`: metadata, `tensors` in model.safetensors, and `extra_json`
    ({file name: dict}) such as quantize_config.json."""
    from safetensors.torch import save_file

    out = Path(out)
    with writing_folder(out) as tmp:
        write_metadata(tmp, model, untied_if_head_quantized(model, model_config(model, quantization_config, dtype)),
                       tokenizer)
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        save_file(dict(sorted(conv1d_layout(model, tensors).items())), str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------------------------------------------
# Reading a folder back

def read_tensors(path: Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in `path` (a truncated or corrupt file is a one-line error);
    progress: a bar over the tensors read, on stderr."""
    from safetensors import safe_open

    from lowbit.io.progress import tensor_bar
    from lowbit.pipeline.checkpoint import read_header, weight_headers

    weight_headers(path)  # pickles refused, no .safetensors named
    files = sorted(Path(path).glob("*.safetensors"))
    headers = {f: read_header(f) for f in files}  # validated by hand before safetensors allocates anything
    tensors = {}
    with tensor_bar(sum(map(len, headers.values())), "reading tensors", progress) as bar:
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for k in fh.keys():
                        tensors[k] = fh.get_tensor(k)
                        bar.update()
            except Exception as e:  # safetensors raises its own types for truncated or corrupt files
                raise LowbitError(f"cannot read {f}: {str(e).splitlines()[0]}") from e
    return tensors


def plain_model(path: Path) -> nn.Module:
    """The model a quantised folder's config.json describes, built in float32 without its quantization
    config (lowbit swaps its own modules in), with Conv1D layers as the Linears lowbit holds."""
    from lowbit.pipeline.loading import conv1d_to_linear, read_config

    if not (Path(path) / "config.json").is_file():
        raise LowbitError(f"not a model folder: {path} (no config.json)")
    config = read_config(Path(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = empty_model(config, path).float()
    conv1d_to_linear(model)
    return model


def finish_import(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path):
    """Load the remaining (float) tensors into `model`, whose quantised modules are already in place;
    (model, tokenizer or None). Missing or unexpected tensors are an error (tied weights may be absent)."""
    from lowbit.pipeline.checkpoint import check_finite
    from lowbit.pipeline.loading import load_tokenizer

    float_state = conv1d_layout(model, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    missing, unexpected = model.load_state_dict(float_state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not _inside_quantized(model, k)]
    if missing or unexpected:
        raise LowbitError(f"{path} does not match the model: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    check_finite(model, path)
    read_generation_config(model, path)
    return model.eval(), load_tokenizer(Path(path))


def _inside_quantized(model: nn.Module, key: str) -> bool:
    owner = model.get_submodule(key.rpartition(".")[0])
    return callable(getattr(owner, "quantized", None))
