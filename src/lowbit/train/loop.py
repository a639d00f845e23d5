"""One training loop for every trainer (QAT, BitNet, FP8): deterministic batches, warm-up + cosine learning
rate, progress on stderr, checkpoints written atomically, and resume.

Resume is exact: the batch of step k and the RNG state it runs under depend only on (seed, k), and a
checkpoint holds the parameters and buffers, the optimizer's state, the loss scaler's state and the loss
history, so a run interrupted and started again with the same settings gives the same losses, step for
step, as one that never stopped (tests/train/test_loop.py kills one to check).

Checkpoints: CHECKPOINT_DIR/step-00000120/{model.safetensors, optimizer.safetensors, state.json}, each
folder renamed into place when complete; older ones are removed once a newer one exists.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit.errors import LowbitError

# Settings that change the trajectory: a checkpoint written under others is not resumed.
TRAJECTORY_FIELDS = ("steps", "lr", "batch_size", "seq_len", "warmup", "min_lr_ratio", "weight_decay",
                     "max_grad_norm", "seed")
STATE_FILE, MODEL_FILE, OPTIMIZER_FILE = "state.json", "model.safetensors", "optimizer.safetensors"


@dataclass(frozen=True)
class LoopSettings:
    """steps: optimizer steps; lr: peak learning rate; batch_size x seq_len tokens per step; warmup: linear
    warm-up steps, then cosine decay to lr * min_lr_ratio at `steps`; max_grad_norm: clipping (0: none);
    eval_every / checkpoint_every / log_every: in steps (0: never; the last step always evaluates and
    checkpoints); minutes: stop early after this much training time (the schedule still spans `steps`);
    threads: torch threads while training (None: as set)."""
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    seq_len: int = 256
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50
    checkpoint_every: int = 50
    log_every: int = 10
    minutes: float | None = None
    threads: int | None = None

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise LowbitError(f"training needs steps >= 1, batch size >= 1 and seq_len >= 2, got {self.steps}, "
                              f"{self.batch_size}, {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LowbitError(f"learning rate must be positive, got {self.lr!r}")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise LowbitError(f"warm-up must be >= 0 and min_lr_ratio in [0, 1], got {self.warmup}, "
                              f"{self.min_lr_ratio}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise LowbitError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise LowbitError(f"--minutes must be positive, got {self.minutes!r}")

    def trajectory(self) -> dict:
        return {k: getattr(self, k) for k in TRAJECTORY_FIELDS}


@dataclass
class History:
    """losses: (step, training loss) of every step run; evals: (step, value of `evaluate`)."""
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    seconds: float = 0.0            # training time, summed over resumed runs (evaluation excluded)
    tokens: int = 0
    resumed_from: int | None = None
    stopped: str = "steps"          # "steps" or "minutes"

    @property
    def steps_done(self) -> int:
        return self.losses[-1][0] + 1 if self.losses else 0

    def to_json(self) -> dict:
        return asdict(self)


def lr_at(step: int, s: LoopSettings) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(s.steps - s.warmup, 1)
    progress = min(1.0, (step - s.warmup) / span)
    floor = s.lr * s.min_lr_ratio
    return floor + (s.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def random_windows(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """batch_size windows of seq_len tokens at seeded random offsets of a 1-D token stream: [batch, seq_len]."""
    starts = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def batch_at(ids: torch.Tensor, step: int, s: LoopSettings) -> torch.Tensor:
    """The batch of step `step`: a function of (seed, step) only, so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
    return random_windows(ids, s.batch_size, s.seq_len, generator)


def check_seq_len(model, seq_len: int) -> None:
    """Refuse training windows longer than the model's context (max_position_embeddings), which would
    train positions the model has no embeddings or rotary range for."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise LowbitError(f"--seq-len {seq_len} is longer than the model's context ({limit} tokens): pass "
                          f"--seq-len {limit} or less")


def _digest(ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


def causal_lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


# ---------------------------------------------------------------------------------------------------
# checkpoints

def _tensor_state(state: dict, prefix: str = "") -> tuple[dict, dict]:
    """Split a nested state dict into (flat tensors, JSON-able rest)."""
    tensors, rest = {}, {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().contiguous().clone()
        elif isinstance(v, dict):
            t, r = _tensor_state(v, f"{key}/")
            tensors.update(t)
            rest[str(k)] = r
        else:
            rest[str(k)] = v
    return tensors, rest


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    return _tensor_state(optimizer.state_dict()["state"])


def _restore_optimizer(optimizer, tensors: dict, rest: dict) -> None:
    state: dict = {}
    for key, t in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = t
    for index, values in rest.items():
        state.setdefault(int(index), {}).update(values)
    # param_groups come from the optimizer as built now (same settings); the lr is set every step anyway
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def save_checkpoint(folder: Path, step: int, model, optimizer, history: History, settings: LoopSettings,
                    run: dict, scaler=None) -> Path:
    """Write CHECKPOINT/step-N atomically, then remove older step folders."""
    from safetensors.torch import save_file

    from lowbit.io.atomic import atomic_output

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"step-{step:08d}"
    model_tensors, _ = _tensor_state(model.state_dict())
    opt_tensors, opt_rest = _optimizer_tensors(optimizer)
    state = {"step": step, "settings": settings.trajectory(), "run": run, "history": history.to_json(),
             "optimizer": opt_rest, "scaler": scaler.state_dict() if scaler is not None else None}
    with atomic_output(out, folder=True) as tmp:
        save_file(model_tensors, str(tmp / MODEL_FILE))
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    for old in folder.glob("step-*"):
        if old != out and old.is_dir():
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    return out


def latest_checkpoint(folder: Path | None) -> Path | None:
    if folder is None or not Path(folder).is_dir():
        return None
    done = sorted(p for p in Path(folder).glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, settings: LoopSettings, run: dict, scaler=None) -> History:
    """Restore model, optimizer and scaler from `path`; refuse one written by another run."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_FILE).read_text())
        model_tensors = load_file(str(path / MODEL_FILE))
        opt_tensors = load_file(str(path / OPTIMIZER_FILE))
    except Exception as e:  # a damaged checkpoint: one line, not a traceback
        raise LowbitError(f"cannot read the checkpoint {path}: {str(e).splitlines()[0] if str(e) else e}") from e
    if state.get("settings") != settings.trajectory() or state.get("run") != run:
        raise LowbitError(f"{path.parent} holds a checkpoint of another run (different settings, model or "
                          f"scheme); remove it or choose another checkpoint folder")
    missing, unexpected = model.load_state_dict(model_tensors, strict=False)
    if missing or unexpected:
        raise LowbitError(f"the checkpoint {path} does not match the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    _restore_optimizer(optimizer, opt_tensors, state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    h = state["history"]
    return History([tuple(x) for x in h["losses"]], [tuple(x) for x in h["evals"]], h["seconds"], h["tokens"],
                   resumed_from=state["step"] + 1)


# ---------------------------------------------------------------------------------------------------
# the loop

def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _step(model, params, optimizer, batch, loss_fn, scaler, autocast_dtype, max_grad_norm) -> float:
    # the batch goes where the parameters are, and autocast follows that device (CPU here, CUDA when lent)
    device = params[0].device
    batch = batch.to(device)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with amp:
        loss = loss_fn(model, batch)
    if not torch.isfinite(loss.detach()) and scaler is None:
        raise LowbitError(f"the training loss became {loss.item()} (try a lower --lr)")
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)   # skipped when the unscaled gradients hold an inf or a NaN
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_loop(model, params, train_ids: torch.Tensor, settings: LoopSettings, *, checkpoint_dir=None,
               run: dict | None = None, evaluate=None, progress: bool = True, loss_fn=causal_lm_loss,
               scaler=None, autocast_dtype: torch.dtype | None = None, optimizer=None) -> History:
    """Train `params` of `model` on next-token loss over the 1-D token stream `train_ids`.

    evaluate(model) -> float is called (under no_grad, in eval mode) every `eval_every` steps and after the
    last one. `run` describes what is trained (model, scheme ...): a checkpoint of another run is refused.
    scaler: a GradScaler-like loss scaler (scale / unscale_ / step / update / state_dict), checkpointed.
    optimizer: default AdamW(params, weight_decay=settings.weight_decay) with fp32 state.
    Returns the History; raises LowbitError for too little text or a diverging loss.
    """
    check_seq_len(model, settings.seq_len)
    ids = torch.as_tensor(train_ids, dtype=torch.int64).reshape(-1)
    if ids.numel() < settings.seq_len + 1:
        raise LowbitError(f"the training text holds {ids.numel()} tokens, fewer than one window of "
                          f"{settings.seq_len}")
    params = list(params)
    if not params:
        raise LowbitError("nothing to train: the model has no trainable parameters")
    # the training tokens are part of what a checkpoint belongs to: another text is another run
    run = json.loads(json.dumps({**(run or {}), "train_ids": _digest(ids)}))
    optimizer = optimizer or torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    last = latest_checkpoint(folder)
    history = load_checkpoint(last, model, optimizer, settings, run, scaler) if last else History()
    if last:
        _log(f"resuming from {last} (step {history.steps_done}/{settings.steps})", progress)
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        _run(model, params, optimizer, ids, settings, history, folder, run, evaluate, progress, loss_fn, scaler,
             autocast_dtype)
    except KeyboardInterrupt as e:   # Ctrl-C: say what the same command again will resume from
        last = latest_checkpoint(folder)
        if last is not None and not getattr(e, "hint", None):
            e.hint = f"lowbit: interrupted; run the same command again to resume from {last}"
        raise
    finally:
        torch.set_num_threads(threads_before)
        model.eval()
    return history


def _run(model, params, optimizer, ids, s, history, folder, run, evaluate, progress, loss_fn, scaler,
         autocast_dtype) -> None:
    budget = s.minutes * 60 if s.minutes else math.inf
    step, tokens_per_step = history.steps_done, s.batch_size * s.seq_len
    model.train()
    while step < s.steps and history.seconds < budget:
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s)
        torch.manual_seed(s.seed * 1_000_003 + step)   # dropout and other randomness of this step
        loss = _step(model, params, optimizer, batch_at(ids, step, s), loss_fn, scaler, autocast_dtype,
                     s.max_grad_norm)
        history.seconds += time.perf_counter() - start
        history.losses.append((step, loss))
        history.tokens += tokens_per_step
        step += 1
        last = step == s.steps or history.seconds >= budget
        _maybe_evaluate(model, evaluate, history, step, s, last)
        if s.log_every and (step % s.log_every == 0 or last):
            _log(_progress_line(history, step, s), progress)
        if folder is not None and (last or (s.checkpoint_every and step % s.checkpoint_every == 0)):
            save_checkpoint(folder, step - 1, model, optimizer, history, s, run, scaler)
    if step < s.steps:
        history.stopped = "minutes"


def _maybe_evaluate(model, evaluate, history, step, s, last) -> None:
    if evaluate is None or not (last or (s.eval_every and step % s.eval_every == 0)):
        return
    model.eval()
    with torch.no_grad():
        history.evals.append((step - 1, float(evaluate(model))))
    model.train()


def _progress_line(h: History, step: int, s: LoopSettings) -> str:
    recent = [loss for _, loss in h.losses[-(s.log_every or 1):]]
    line = (f"step {step}/{s.steps}  loss {sum(recent) / len(recent):.4f}  lr {lr_at(step - 1, s):.2e}  "
            f"{h.seconds:.0f} s  {h.tokens / max(h.seconds, 1e-9):,.0f} tok/s")
    if h.evals and h.evals[-1][0] == step - 1:
        line += f"  eval {h.evals[-1][1]:.4f}"
    return line


# ---------------------------------------------------------------------------------------------------
# loss curves

def write_loss_curve(path, curves: dict, title: str = "training loss", eval_label: str = "held-out",
                     eval_axis: str | None = None) -> Path | None:
    """One PNG with the training loss (a moving mean over 10 steps) of every History in `curves`
    ({label: History}) and its evaluation points; with `eval_axis` (its label) the evaluations get their
    own y axis on the right (when they measure something else, e.g. held-out NLL beside a distillation
    KL). None (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from lowbit.io.atomic import atomic_output

    fig, ax = plt.subplots(figsize=(7, 4.2))
    right = ax.twinx() if eval_axis else ax
    for label, h in curves.items():
        steps = [s for s, _ in h.losses]
        losses = [v for _, v in h.losses]
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        (line,) = ax.plot(steps, smooth, label=f"{label} (train)", linewidth=1.2)
        if h.evals:
            right.plot([s for s, _ in h.evals], [v for _, v in h.evals], "o--", color=line.get_color(),
                       label=f"{label} ({eval_label})", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    if eval_axis:
        right.set_ylabel(eval_axis)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = [h for a in {ax, right} for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path, folder=False) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


__all__ = ["LoopSettings", "History", "train_loop", "lr_at", "batch_at", "random_windows", "causal_lm_loss",
           "save_checkpoint", "load_checkpoint", "latest_checkpoint", "write_loss_curve", "check_seq_len"]
