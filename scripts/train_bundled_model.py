"""Train lowbit's bundled tiny Llama model on the bundled corpus, on CPU.

Produces ``data/lowbit-tiny-llama/``: a byte-level BPE tokenizer (vocab 4096)
and a 4-layer ``LlamaForCausalLM`` (hidden 256, MLP 768, 4 query heads sharing
2 key/value heads), stored as float16 safetensors, plus ``training.json``.
The widths are chosen so that quantisation groups of 32..256 and llama.cpp's
256-element super-blocks divide the input dimension of every Linear layer.

Token streams: every document of a split is encoded on its own with the saved
tokenizer, which prepends ``<|endoftext|>`` (bos == eos == pad), and the
results are concatenated.  A document therefore starts right after an
``<|endoftext|>`` token, exactly as a prompt does at inference time.
Held-out perplexity is measured on ``eval.txt`` over non-overlapping 256-token
windows of that stream (a trailing partial window is dropped).

Training stops at ``--max-steps``, when held-out perplexity has not improved
for ``--patience`` evaluations, or when the ``--minutes`` wall-clock budget of
the training loop is spent; the cosine decay ends at whichever of the first
and last comes first.  The best evaluated weights are saved.  Everything is
seeded; on a machine too slow to reach ``--max-steps`` within the budget, the
schedule and stopping point depend on its speed.

bf16 autocast is on by default because it measured about 1.5x faster than
float32 on the AVX512-BF16 CPU the bundled model was trained on (5,900 vs
4,000 tokens/s on 2 threads); ``--no-bf16`` trains in float32.

Usage: python scripts/train_bundled_model.py [--minutes 45]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Set before transformers/huggingface_hub read it at import: the bundled model
# must never depend on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
END_OF_TEXT = "<|endoftext|>"
DOC_SEPARATOR = f"\n{END_OF_TEXT}\n"  # must match scripts/build_corpus.py
VOCAB_SIZE = 4096
MAX_POSITIONS = 512


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO_ROOT / "data" / "corpus")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "lowbit-tiny-llama")
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget of the training loop")
    parser.add_argument("--max-steps", type=int, default=1200, help="length of the cosine schedule")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--patience", type=int, default=5, help="evaluations without improvement before stopping"
    )
    parser.add_argument("--log-every", type=int, default=20)
    # On a machine busy with other work, --threads 1 can be several times faster:
    # every op joins its two threads, and the join stalls whenever one of them
    # is descheduled (at load 6-12: ~290 tok/s with 2 threads, 1,300-2,400 with 1).
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=True,
        help="bf16 autocast for training steps (evaluation is always float32)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="timing runs: train and report, write nothing")
    return parser.parse_args()


def read_documents(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").removesuffix("\n")
    return text.split(DOC_SEPARATOR)


# --- tokenizer ---------------------------------------------------------------


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE that prepends <|endoftext|> to every text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        # All 256 byte symbols, so any UTF-8 text stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    eot_id = tokenizer.token_to_id(END_OF_TEXT)
    # Llama convention: the tokenizer adds bos, so a prompt looks like the
    # start of a training document.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{END_OF_TEXT} $A",
                pair=f"{END_OF_TEXT} $A {END_OF_TEXT} $B:1",
                special_tokens=[(END_OF_TEXT, eot_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=MAX_POSITIONS,
    )


def encode_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    # Documents are longer than the context on purpose; they are cut into windows later.
    encoded = tokenizer(documents, add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor([token for doc in encoded for token in doc], dtype=torch.long)


# --- model ------------------------------------------------------------------


def build_model(eot_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, so lowbit exercises it
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )
    return LlamaForCausalLM(config)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- data -------------------------------------------------------------------


def eval_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n_windows = len(stream) // seq_len
    return stream[: n_windows * seq_len].view(n_windows, seq_len)


def training_batches(stream: torch.Tensor, seq_len: int, batch_size: int, seed: int):
    """Endless (epoch, batch) iterator; each epoch uses a seeded offset and order.

    The offset shifts window boundaries between epochs, so the model does not
    see the same 256-token cuts every time on this small corpus.
    """
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        offset = int(torch.randint(seq_len, (1,), generator=generator))
        windows = eval_windows(stream[offset:], seq_len)
        order = torch.randperm(len(windows), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield epoch, windows[order[start : start + batch_size]]
        epoch += 1


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


# --- training ---------------------------------------------------------------


def learning_rate(step: int, elapsed_seconds: float, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to the floor.

    The decay ends at --max-steps or at the end of the --minutes budget,
    whichever comes first, so a slow or busy machine still finishes with a
    decayed learning rate instead of being cut off at the peak. On a machine
    fast enough to reach --max-steps in time the schedule depends on the step
    alone and the run is reproducible.
    """
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    step_progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    time_progress = elapsed_seconds / (args.minutes * 60)
    progress = min(1.0, max(step_progress, time_progress))
    floor = args.min_lr_ratio
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # Norm gains are not decayed: pulling them to zero only hurts.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class TrainResult:
    steps: int = 0
    tokens_seen: int = 0
    epochs: float = 0.0
    train_seconds: float = 0.0
    best_step: int = 0
    best_eval_ppl: float = float("inf")
    best_state: dict = field(default_factory=dict)
    stop_reason: str = ""
    history: list = field(default_factory=list)


def train(model, train_stream, eval_data, args) -> TrainResult:
    optimizer = make_optimizer(model, args)
    batches = training_batches(train_stream, args.seq_len, args.batch_size, args.seed)
    windows_per_epoch = len(train_stream) // args.seq_len
    result = TrainResult()
    budget_seconds = args.minutes * 60
    evals_without_gain = 0
    model.train()
    start = time.perf_counter()
    log_start, log_tokens, loss_sum = start, 0, 0.0
    try:
        for step in range(args.max_steps):
            epoch, batch = next(batches)
            lr = learning_rate(step, time.perf_counter() - start, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            result.steps = step + 1
            result.tokens_seen += batch.numel()
            log_tokens += batch.numel()
            loss_sum += loss.item()
            elapsed = time.perf_counter() - start

            if result.steps % args.log_every == 0:
                now = time.perf_counter()
                print(
                    f"step {result.steps:5d} epoch {epoch:3d} loss {loss_sum / args.log_every:.4f} "
                    f"lr {lr:.2e} tok/s {log_tokens / (now - log_start):7.0f} "
                    f"elapsed {elapsed / 60:6.2f} min",
                    flush=True,
                )
                log_start, log_tokens, loss_sum = now, 0, 0.0

            last_step = result.steps == args.max_steps or elapsed >= budget_seconds
            if result.steps % args.eval_every == 0 or last_step:
                eval_start = time.perf_counter()
                ppl = perplexity(model, eval_data)
                improved = ppl < result.best_eval_ppl
                result.history.append(
                    {"step": result.steps, "eval_ppl": round(ppl, 4), "minutes": round(elapsed / 60, 2)}
                )
                marker = "  (best)" if improved else ""
                print(f"eval step {result.steps:5d} held-out ppl {ppl:8.3f}{marker}", flush=True)
                if improved:
                    result.best_eval_ppl, result.best_step = ppl, result.steps
                    result.best_state = copy.deepcopy(model.state_dict())
                    evals_without_gain = 0
                else:
                    evals_without_gain += 1
                if evals_without_gain >= args.patience:
                    result.stop_reason = f"no held-out improvement in {args.patience} evaluations"
                    break
                # Keep the logged tokens/s about training steps only.
                log_start += time.perf_counter() - eval_start
            # Evaluation time counts against the budget too.
            if time.perf_counter() - start >= budget_seconds:
                result.stop_reason = f"wall-clock budget of {args.minutes} minutes reached"
                break
        else:
            result.stop_reason = f"end of schedule ({args.max_steps} steps)"
    except KeyboardInterrupt:
        result.stop_reason = "interrupted"
    result.train_seconds = time.perf_counter() - start
    result.epochs = result.tokens_seen / (windows_per_epoch * args.seq_len)
    return result


# --- saving and verification -------------------------------------------------


def save_model(model, state: dict, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.load_state_dict(state)
    # float16 halves the committed size; lowbit loads it back as float32.
    model.to(torch.float16).save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def verify_saved(out: Path, eval_documents: list[str], seq_len: int, prompt: str) -> tuple[float, str]:
    """Reload exactly as a user would and measure what was actually saved."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ppl = perplexity(model, eval_windows(encode_stream(tokenizer, eval_documents), seq_len))
    inputs = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    return ppl, tokenizer.decode(generated[0], skip_special_tokens=True)


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    script_start = time.perf_counter()

    splits = {name: read_documents(args.corpus / f"{name}.txt") for name in ("train", "calibration", "eval")}
    tokenizer = train_tokenizer(splits["train"], VOCAB_SIZE)
    streams = {name: encode_stream(tokenizer, docs) for name, docs in splits.items()}
    for name, docs in splits.items():
        chars = sum(len(doc) for doc in docs)
        print(f"{name:12s} {len(docs):4d} docs {chars:10,d} chars {len(streams[name]):9,d} tokens")

    eot_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    model = build_model(eot_id)
    n_params = parameter_count(model)
    print(f"model: {n_params:,} parameters, bf16 autocast: {args.bf16}, threads: {torch.get_num_threads()}")

    eval_data = eval_windows(streams["eval"], args.seq_len)
    result = train(model, streams["train"], eval_data, args)
    tokens_per_second = result.tokens_seen / result.train_seconds
    print(
        f"stopped: {result.stop_reason}; {result.steps} steps, {result.tokens_seen:,} tokens "
        f"({result.epochs:.1f} epochs) in {result.train_seconds / 60:.1f} min, "
        f"{tokens_per_second:.0f} tok/s; "
        f"best held-out ppl {result.best_eval_ppl:.3f} at step {result.best_step}"
    )
    if args.no_save:
        return

    save_model(model, result.best_state, tokenizer, args.out)
    prompt = "The return value"
    saved_ppl, sample = verify_saved(args.out, splits["eval"], args.seq_len, prompt)
    print(f"saved float16 model: held-out ppl {saved_ppl:.3f}\nsample: {sample!r}")

    write_report(
        args.out / "training.json",
        {
            "command": shlex.join(["python", "scripts/train_bundled_model.py", *sys.argv[1:]]),
            "seed": args.seed,
            "parameters": n_params,
            "tokens_seen": result.tokens_seen,
            "steps": result.steps,
            "epochs": round(result.epochs, 2),
            "best_step": result.best_step,
            "stop_reason": result.stop_reason,
            "train_wall_seconds": round(result.train_seconds, 1),
            "total_wall_seconds": round(time.perf_counter() - script_start, 1),
            "train_tokens_per_second": round(tokens_per_second),
            "best_eval_perplexity_fp32": round(result.best_eval_ppl, 4),
            "final_eval_perplexity": round(saved_ppl, 4),
            "final_eval_perplexity_note": (
                "float16 weights reloaded as float32; eval.txt, each document prefixed with "
                f"{END_OF_TEXT}, non-overlapping {args.seq_len}-token windows, partial tail dropped"
            ),
            "eval_windows": len(eval_data),
            "corpus_tokens": {name: len(stream) for name, stream in streams.items()},
            "corpus_documents": {name: len(docs) for name, docs in splits.items()},
            "hyperparameters": {
                key: value
                for key, value in vars(args).items()
                if key not in {"corpus", "out", "no_save"}
            },
            "sample": {"prompt": prompt, "greedy_40_tokens": sample},
            "eval_history": result.history,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
                "cpu_threads": args.threads,
                "machine": platform.machine(),
            },
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
