"""BitNet b1.58 training: BitLinear's straight-through gradients, conversion of a model to BitLinear and on to
real ternary weights (same outputs), a native save that reloads them, and the `lowbit bitnet` command."""
import json

import pytest
import torch
from torch import nn

from lowbit.cli import main
from lowbit.kernels.ternary import quantize_tokens_int8
from lowbit.methods.bitnet import absmean_scale, ternary_codes
from lowbit.nn import TernaryLinear
from lowbit.train.bitnet import BitLinear, block_linears, to_bitnet, to_ternary
from tests.train.helpers import interrupted_at


def _llama(seed=0):
    import transformers as t

    torch.manual_seed(seed)
    config = t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, vocab_size=97)
    return t.LlamaForCausalLM(config)


def test_straight_through_gradients_are_those_of_the_quantised_operands(one_thread):
    """Forward: x quantised per token to int8, W to gamma * ternary. Backward: dL/dW and dL/dx are the gradients
    with respect to the quantised W and x (identity through both roundings, as the authors' code)."""
    torch.manual_seed(0)
    lin = BitLinear.from_linear(nn.Linear(32, 8))
    x = torch.randn(5, 32, requires_grad=True)
    y = lin(x)
    (y * torch.arange(8.0)).sum().backward()

    gamma = absmean_scale(lin.weight)
    wq = (ternary_codes(lin.weight, gamma).float() * gamma).requires_grad_()
    xq, s = quantize_tokens_int8(x.detach())
    xf = (xq.float() / s).requires_grad_()
    y2 = torch.nn.functional.linear(xf, wq, lin.bias.detach())
    (y2 * torch.arange(8.0)).sum().backward()
    assert torch.equal(y.detach(), y2.detach())
    assert torch.equal(lin.weight.grad, wq.grad) and torch.equal(x.grad, xf.grad)


def test_conversion_keeps_embeddings_head_and_norms_float_and_ternary_outputs_match(one_thread, tmp_path):
    model = _llama().eval()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    to_bitnet(model)
    assert len(block_linears(model)) == 2 * 7 and all(isinstance(m, BitLinear) for m in block_linears(model).values())
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    with torch.no_grad():
        fake = model(ids).logits
    to_ternary(model)
    assert all(isinstance(m, TernaryLinear) for m in block_linears(model).values())
    with torch.no_grad():
        real = model(ids).logits
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4)   # same values, another summation order

    from lowbit.io.native import load, save

    save(model, tmp_path / "bitnet")
    loaded = load(tmp_path / "bitnet")
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    assert isinstance(loaded.model.layers[0].mlp.down_proj, TernaryLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, real)


def test_bitnet_command_trains_converts_and_saves(tiny_model_dir, tmp_path, capsys, one_thread):
    src = tiny_model_dir("llama")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    args = [str(src), "-o", str(out), "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--warmup", "1",
            "--eval-every", "0", "--train-file", str(text), "--eval-file", str(text), "--quiet"]
    assert main(["bitnet", *args, "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 2 * 32
    assert summary["weight_bits"]["bits_per_weight"] == pytest.approx(1.6, abs=0.01)
    from lowbit.api import load_model

    model, _ = load_model(out)
    assert isinstance(model.model.layers[1].self_attn.q_proj, TernaryLinear)
    assert (tmp_path / "out" / "bitnet_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "lowbit_bitnet.json").read_text())["steps"] >= 1
    assert not (tmp_path / "out.checkpoints").exists()   # the run is complete: nothing left to resume
    assert main(["bitnet", *args]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["bitnet", str(src), "-o", str(tmp_path / "o2"), "--packing", "3bit"]) == 2
    err = capsys.readouterr().err
    assert "packing" in err and len(err.strip().splitlines()) == 1


def test_interrupted_command_resumes_to_the_uninterrupted_model(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    """Ctrl-C after step 3 of 5 keeps the checkpoint of step 2; the same command again resumes there and saves
    exactly the model an uninterrupted run saves."""
    from safetensors.torch import load_file

    import lowbit.train.loop as loop

    src = tiny_model_dir("llama")
    text = tmp_path / "t.txt"
    text.write_text("a stitch in time saves nine; " * 300)

    def run(out):
        return main(["bitnet", str(src), "-o", str(out), "--steps", "5", "--batch-size", "2", "--seq-len", "16",
                     "--warmup", "1", "--eval-every", "0", "--checkpoint-every", "2", "--train-file", str(text),
                     "--eval-file", str(text), "--quiet"])

    assert run(tmp_path / "whole") == 0
    real_step = loop._step
    monkeypatch.setattr(loop, "_step", interrupted_at(4, real_step))
    assert run(tmp_path / "resumed") == 130 and not (tmp_path / "resumed").exists()
    assert (tmp_path / "resumed.checkpoints").is_dir()
    rerun = {"n": 0}

    def counted(*a, **k):
        rerun["n"] += 1
        return real_step(*a, **k)

    monkeypatch.setattr(loop, "_step", counted)
    assert run(tmp_path / "resumed") == 0 and rerun["n"] == 3      # steps 3..5: resumed after step 2's checkpoint
    whole, resumed = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("whole", "resumed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_bitnet_user_mistakes_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    import shutil

    src = tiny_model_dir("llama")
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, bare / name)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    limit = json.loads((src / "config.json").read_text())["max_position_embeddings"]
    capsys.readouterr()
    for args, words in (([str(bare), "--from-scratch"], "no tokenizer"), ([str(bare)], "no tokenizer"),
                        ([str(src), "--train-file", str(empty)], "training text is empty"),
                        ([str(src), "--seq-len", str(limit + 1)], "longer than the model's context"),
                        ([str(src), "--weight-decay", "nan"], "weight-decay")):
        assert main(["bitnet", "--seq-len", "32", *args, "-o", str(tmp_path / "out"), "--steps", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lowbit: error:") and words in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
