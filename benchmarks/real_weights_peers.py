"""The peers' side of benchmarks/real_weights.py: run inside benchmarks/.venv-peers, never imported by lowbit.

    .venv-peers/bin/python real_weights_peers.py JOB.json OUT.safetensors

JOB.json: {"model": folder, "calibration": [sentences], "eval": [sentences], "threads": n, "max_length": L,
           "runs": [{"name": ..., "kind": "llmcompressor" | "bnb" | "hqq" | "fp32", ...}]}
OUT: one embedding matrix [n_eval, hidden] float32 per run name (mean-pooled over real tokens, L2-normalised,
exactly as lowbit.eval.embeddings.embed computes them), plus "<name>.seconds".

llm-compressor: `oneshot` with a GPTQModifier of scheme W{bits}A16 (int, symmetric, group 128; "channel"
for group_size None), its default observer (min-max), dampening and activation ordering ("static"), every
Linear targeted, on the calibration sentences tokenised one per sample with [CLS] ... [SEP] (batch size 1,
as its default), sequential pipeline over the BertLayer blocks.
bitsandbytes: quantize_4bit / dequantize_4bit per Linear (what Linear4bit computes with), NF4 or FP4,
blocks of 64. hqq: Quantizer.quantize with the given bits and group along the input dimension (axis 1),
its proximal optimisation on (its default), asymmetric with a float zero.
"""
import json
import sys
import time

import torch
from safetensors.torch import save_file


def embed(model, tok, sentences, max_length, batch_size=32):
    out = [torch.empty(0, model.config.hidden_size)]   # no sentences (a capture-only run): an empty matrix
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            enc = tok(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(out)


def load(folder):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def run_llmcompressor(model, tok, job, run):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    rows = [tok(s, truncation=True, max_length=job["max_length"]) for s in job["calibration"]]
    ds = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                            "attention_mask": [r["attention_mask"] for r in rows],
                            "token_type_ids": [r["token_type_ids"] for r in rows]})
    kwargs = {"scheme": f"W{run['bits']}A16"} if run.get("group_size", 128) == 128 else {
        "config_groups": {"g": {"targets": ["Linear"], "weights": {
            "num_bits": run["bits"], "type": "int", "symmetric": True, "strategy": "channel"}}}}
    recipe = GPTQModifier(targets="Linear", ignore=[], **kwargs, **run.get("options", {}))
    if run.get("capture"):
        capture_hessians(CAPTURED)
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(rows),
            max_seq_length=job["max_length"], shuffle_calibration_samples=False, pipeline="sequential",
            sequential_targets=["BertLayer"])
    # GPTQ wrote the fake-quantised weights into each Linear; its frozen forward rounds them again on the
    # same grid (a no-op), so the model computes with exactly what a compressed checkpoint holds
    return model


CAPTURED = {}


def capture_hessians(store: dict) -> None:
    """Record each module's weight and normalised Hessian as llm-compressor hands them to GPTQ
    (H / n_samples with H = sum of 2 x x^T over every token of the samples)."""
    from llmcompressor.modifiers.gptq import base

    original = base.GPTQModifier.compress_module_list

    def recording(self, module_list):
        for module in module_list:
            name = self._module_names[module]
            store[name + ".h"] = (self._hessians[module] / self._num_samples[module]).contiguous().clone()
            store[name + ".w"] = module.weight.detach().float().contiguous().clone()
        return original(self, module_list)

    base.GPTQModifier.compress_module_list = recording


def run_bnb(model, tok, job, run):
    import bitsandbytes.functional as F

    for _, m in linears(model):
        q, state = F.quantize_4bit(m.weight.data, blocksize=run.get("blocksize", 64), quant_type=run["quant_type"])
        m.weight.data = F.dequantize_4bit(q, state).to(torch.float32)
    return model


def run_hqq(model, tok, job, run):
    from hqq.core.quantize import Quantizer

    for _, m in linears(model):
        w_q, meta = Quantizer.quantize(m.weight.data, nbits=run["bits"], group_size=run["group_size"], axis=1,
                                       optimize=True, bitpack=False, compute_dtype=torch.float32, device="cpu")
        meta["compute_dtype"] = torch.float32
        m.weight.data = Quantizer.dequantize(w_q, meta).reshape(m.weight.shape).float()
    return model


RUNNERS = {"llmcompressor": run_llmcompressor, "bnb": run_bnb, "hqq": run_hqq, "fp32": lambda m, t, j, r: m}


def main():
    job = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(job.get("threads", 1))
    out = {}
    for run in job["runs"]:
        model, tok = load(job["model"])
        t = time.perf_counter()
        model = RUNNERS[run["kind"]](model, tok, job, run)
        seconds = time.perf_counter() - t
        out[run["name"]] = embed(model, tok, job["eval"], job["max_length"]).contiguous()
        out[run["name"] + ".seconds"] = torch.tensor(seconds, dtype=torch.float64)
        if run.get("capture"):   # the peer's Hessians and weights, and the weights its GPTQ chose
            out.update({f"{run['name']}.{k}": v for k, v in CAPTURED.items()})
            out.update({f"{run['name']}.{n}.q": m.weight.detach().float().contiguous() for n, m in linears(model)})
        print(f"peer {run['name']}: {seconds:.0f} s", file=sys.stderr, flush=True)
    save_file(out, sys.argv[2])


if __name__ == "__main__":
    main()
