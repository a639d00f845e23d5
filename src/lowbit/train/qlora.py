"""QLoRA: low-rank adapters trained in fp32 on top of a frozen NF4 base (Dettmers et al. 2023).

Each target Linear becomes base(x) + B(A(dropout(x))) * alpha / rank, with A [rank, in] and B [out, rank]
the only trainable tensors (B starts at zero, so training starts from the quantised model's outputs).
The base may be a Linear4bit (QLoRA) or a plain nn.Linear (LoRA). Adapters are saved as a PEFT folder
(adapter_config.json + adapter_model.safetensors, PEFT's key names), which peft.PeftModel.from_pretrained
loads onto the full-precision base, and load_adapter() loads back onto a lowbit model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.train.loop import random_windows

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."   # PeftModel -> LoraModel -> the wrapped model


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LowbitError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise LowbitError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise LowbitError("LoRA needs at least one target module name")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen base Linear plus a trainable fp32 low-rank update (PEFT's lora.Linear, one adapter)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        # PEFT's default start: A like nn.Linear's own init, B zero (the update starts at exactly 0)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scaling).to(y.dtype)


def _is_target(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of names: the module's full name is one, or ends with '.' + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_linear_like(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features") and not isinstance(module, LoraLinear)


def add_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze every parameter of `model` and wrap each target Linear in a LoraLinear. Returns their names."""
    from lowbit.pipeline.loading import set_module

    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if _is_target(n, settings.target_modules) and _is_linear_like(m)]
    if not names:
        raise LowbitError(f"no Linear matches the LoRA targets {', '.join(settings.target_modules)}")
    generator = torch.Generator().manual_seed(settings.seed)
    for name in names:
        base = model.get_submodule(name)
        lora = LoraLinear(base, settings.rank, settings.alpha, settings.dropout, generator)
        set_module(model, name, lora.train(model.training))  # a new module would otherwise be in train mode
    model.lowbit_lora = settings
    return names


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------
# PEFT folder

def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's saved names: base_model.model.<module>.lora_A.weight ..."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().clone()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().clone()
    return out


def peft_config(settings: LoraSettings, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json: the LoraConfig fields that describe a plain LoRA on named modules."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted(settings.target_modules), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }


def save_adapter(model: nn.Module, out, base_model_name_or_path: str | None = None,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write the adapters of `model` as a PEFT folder (renamed into place when complete)."""
    from safetensors.torch import save_file

    from lowbit.io.hf_folder import writing_folder

    settings = getattr(model, "lowbit_lora", None)
    if settings is None or not lora_modules(model):
        raise LowbitError("the model carries no LoRA adapters to save (add_lora first)")
    out = Path(out)
    with writing_folder(out) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(settings, base_model_name_or_path), indent=2))
        save_file(peft_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def _read_adapter_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"cannot read {folder / ADAPTER_CONFIG}: {e}")
    if cfg.get("peft_type") != "LORA":
        raise LowbitError(f"{folder} holds a {cfg.get('peft_type')!r} adapter; only LORA is supported")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out") if cfg.get(k)]
    if unsupported or cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("bias", "none") != "none":
        raise LowbitError(f"{folder}: adapter options not supported here: {unsupported or 'per-module patterns/bias'}")
    if not isinstance(cfg.get("target_modules"), list):
        raise LowbitError(f"{folder}: target_modules must be a list of module names")
    return cfg


def load_adapter(model: nn.Module, folder) -> list[str]:
    """Wrap `model`'s target Linears and load a PEFT LoRA folder's weights into them (eval: no dropout)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = _read_adapter_config(folder)
    settings = LoraSettings(cfg["r"], cfg["lora_alpha"], 0.0, tuple(cfg["target_modules"]))
    names = add_lora(model, settings)
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own types for missing or corrupt files
        raise LowbitError(f"cannot read {folder / ADAPTER_WEIGHTS}: {str(e).splitlines()[0]}") from e
    expected = set(peft_state_dict(model))
    if set(tensors) != expected:
        raise LowbitError(f"{folder} does not match the model: missing {sorted(expected - set(tensors))[:3]}, "
                          f"unexpected {sorted(set(tensors) - expected)[:3]}")
    for name, m in lora_modules(model).items():
        m.lora_A.weight.data.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
        m.lora_B.weight.data.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return names


# ---------------------------------------------------------------------------------------------------
# Training

@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    lr: float = 2e-4
    batch_size: int = 8
    seq_len: int = 256
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise LowbitError(f"training needs steps, batch size >= 1 and seq_len >= 2, got {self.steps}, "
                              f"{self.batch_size}, {self.seq_len}")
        if not self.lr > 0:
            raise LowbitError(f"learning rate must be positive, got {self.lr!r}")


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)   # training loss of every step
    seconds: float = 0.0


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then linear decay to zero at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    remaining = settings.steps - settings.warmup
    return settings.lr * max(0.0, (settings.steps - step) / max(remaining, 1))


def train_lora(model: nn.Module, ids: torch.Tensor, settings: TrainSettings, progress=None) -> TrainResult:
    """Train the adapters (the model's only trainable parameters) on next-token loss over `ids` (1-D)."""
    import time

    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if ids.numel() < settings.seq_len + 1:
        raise LowbitError(f"the training text holds {ids.numel()} tokens, fewer than one window of {settings.seq_len}")
    params = trainable_parameters(model)
    if not params:
        raise LowbitError("the model has no trainable parameters (add_lora first)")
    torch.manual_seed(settings.seed)  # dropout masks
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    _set_checkpointing(model, settings.gradient_checkpointing)
    model.train()
    result, start = TrainResult(), time.perf_counter()
    try:
        for step in range(settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, settings)
            batch = random_windows(ids, settings.batch_size, settings.seq_len, generator)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss.item())
            if progress is not None:
                progress(step, result.losses[-1])
    finally:
        model.eval()
        _set_checkpointing(model, False)
    result.seconds = time.perf_counter() - start
    return result


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; use what exists
    renamed = hasattr(model, "activation_checkpointing_enable")
    prefix = "activation" if renamed else "gradient"
    if on:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise LowbitError(f"{type(model).__name__} does not support gradient checkpointing")
        # non-reentrant: the frozen base gives the inputs no gradient, which the reentrant variant needs
        getattr(model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    elif getattr(model, f"is_{prefix}_checkpointing", False):
        getattr(model, f"{prefix}_checkpointing_disable")()


__all__ = ["LoraSettings", "LoraLinear", "TrainSettings", "TrainResult", "add_lora", "lora_modules",
           "load_adapter", "save_adapter", "peft_state_dict", "peft_config", "train_lora", "DEFAULT_TARGETS"]
