import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval.compare import compare, parse_methods
from lowbit.eval.evaluate import eval_windows
from lowbit.eval.perplexity import perplexity

METHODS = "fp16,rtn-int8,rtn-int4-g128"
QUICK = dict(max_eval_tokens=600, context=64, speed=False, progress=None)


@pytest.fixture(scope="module")
def rows(tiny_dir):
    return compare(METHODS, tiny_dir, **QUICK)


def linear_weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


def test_rows_carry_the_promised_fields(rows):
    assert [r["method"] for r in rows] == METHODS.split(",")
    for r in rows:
        for key in ("method", "bits_per_weight", "memory_bytes", "perplexity", "kl", "tokens_per_s"):
            assert key in r
        assert r["n_scored"] == 9 * 63  # 600 tokens -> 9 windows of 64


def test_fp16_row_is_the_reference(rows, tiny_dir, tiny_tokenizer):
    from lowbit import api

    fp16 = rows[0]
    model, tok = api.load_model(tiny_dir)
    direct = perplexity(model, eval_windows(model, tok, max_eval_tokens=600, context=64).ids, context=64)
    assert fp16["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)
    assert fp16["kl"] == pytest.approx(0, abs=1e-9) and fp16["top1"] == 1.0 and fp16["delta_ppl"] == 0
    n_float = sum(p.numel() for p in model.parameters())
    assert fp16["bits_per_weight"] == 16 and fp16["memory_bytes"] == 2 * n_float


def test_quantised_rows_follow_the_memory_convention(rows, tiny_dir):
    from lowbit import api

    model, _ = api.load_model(tiny_dir)
    weights = linear_weights(model)
    n_linear = sum(w.numel() for w in weights.values())
    n_rest = sum(p.numel() for p in model.parameters()) - n_linear
    rows_out = sum(w.shape[0] for w in weights.values())
    int8 = rows[1]  # per output channel: 8-bit codes + one fp16 scale per row
    assert int8["quantized_linear_bytes"] == n_linear + 2 * rows_out
    assert int8["memory_bytes"] == n_linear + 2 * rows_out + 2 * n_rest
    assert int8["bits_per_weight"] == pytest.approx(8 * (n_linear + 2 * rows_out) / n_linear)
    int4 = rows[2]  # groups of 128 along the input: 4 bits per weight + one fp16 scale per group
    groups = sum(w.shape[0] * w.shape[1] // 128 for w in weights.values())
    assert int4["quantized_linear_bytes"] == n_linear // 2 + 2 * groups
    assert int4["memory_bytes"] < int8["memory_bytes"] < rows[0]["memory_bytes"]


def test_quality_orders_as_bits_do(rows):
    _, int8, int4 = rows
    assert 0 < int8["kl"] < int4["kl"] and int4["top1"] < 1
    assert abs(int8["delta_ppl"]) < abs(int4["delta_ppl"])


def test_unknown_method_is_a_user_error_before_loading():
    with pytest.raises(LowbitError, match="unknown method"):
        parse_methods("fp16,bogus-int4")
    with pytest.raises(LowbitError, match="twice"):
        parse_methods("fp16,fp16")


def test_a_named_recipe_is_a_row(rows, tiny_dir):
    """A Planned row carries a Recipe (the advisor measures a budgeted mix this way): the recipe of one
    method scores as that method's row does, and a half-and-half mix lands between its two schemes."""
    from lowbit.eval.compare import Planned
    from lowbit.methods.recipe import Recipe

    same, half = compare([Planned("int8 recipe", Recipe("rtn-int8")),
                          Planned("mix", Recipe("rtn-int4-g128", overrides=[("*mlp*", "rtn-int8")]))],
                         tiny_dir, **QUICK)
    assert same["method"] == "int8 recipe" and same["kl"] == rows[1]["kl"]
    assert same["quantized_linear_bytes"] == rows[1]["quantized_linear_bytes"]
    assert rows[2]["quantized_linear_bytes"] < half["quantized_linear_bytes"] < rows[1]["quantized_linear_bytes"]
    assert rows[1]["kl"] < half["kl"] < rows[2]["kl"]
    with pytest.raises(LowbitError, match="listed twice"):
        parse_methods([Planned("mix", Recipe("rtn-int8")), Planned("mix", Recipe("rtn-int8"))])


def test_a_loaded_base_is_not_loaded_again(rows, tiny_dir, monkeypatch):
    """compare(loaded=(model, tokenizer)) scores that model (the advisor loads it once for sensitivity and
    rows) and gives the rows loading it would."""
    from lowbit import api

    loaded = api.load_model(tiny_dir)

    def no_load(*a, **k):
        raise AssertionError("loaded again")

    monkeypatch.setattr(api, "load_model", no_load)
    again = compare(METHODS, tiny_dir, loaded=loaded, **QUICK)
    assert [(r["perplexity"], r["kl"]) for r in again] == [(r["perplexity"], r["kl"]) for r in rows]
