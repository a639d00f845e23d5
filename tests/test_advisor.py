"""The advisor: its table for 7B/13B/70B classes at 8/24/48/80 GB, sizes that are the calculators', sizes
against llama.cpp's published file sizes, the runtime reserve, the budgeted mixes that spend headroom, and
its refusals."""
import json
import math

import pytest

from lowbit.advisor import (BALANCED_SHARE, PRESET_SHAPES, RESERVE_FLOOR, TARGETS, VLLM_UTILISATION, advise,
                            parse_bytes, runtime_reserve)
from lowbit.advisor_mix import MIX_MIN_GAIN, MIX_PLANS, NO_MIX, candidates, gguf_file_types
from lowbit.calc import GB, GIB, kv_cache_memory, mix_size, model_size
from lowbit.cli import main
from lowbit.errors import LowbitError

CLASSES, BUDGETS = ("7b", "13b", "70b"), (8, 24, 48, 80)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("quality", ["max", "balanced"])
def test_every_pick_fits_and_its_size_is_the_calculators(target, quality):
    for cls in CLASSES:
        shape = PRESET_SHAPES[cls]
        for gb in BUDGETS:
            a = advise(cls, f"{gb}GB", target, quality)
            assert a.reserve_bytes == runtime_reserve(shape, target, 4096, 1)
            usable = gb * GB * (VLLM_UTILISATION if target == "vllm" else 1) - a.reserve_bytes
            for o in a.options:
                assert o.weight_bytes == model_size(shape, o.method).bytes
                if target != "finetune":
                    assert o.other_bytes == kv_cache_memory(shape.layers, shape.kv_heads, shape.head_dim, 4096).bytes
                assert o.fits == (o.total_bytes <= usable)
            fitting = [o for o in a.options if o.fits]
            assert (a.pick is None) == (not fitting)
            if a.pick is None:
                assert "will not fit" in a.reasons[1]
                continue
            if quality == "max":
                assert a.pick is fitting[0]
            else:
                usual = next(i for i, (*_, u) in enumerate(TARGETS[target]) if u)   # presets take every option
                roomy = [o for o in a.options[:usual] if o.total_bytes <= BALANCED_SHARE * usable]
                assert a.pick is (roomy[0] if roomy else next(o for o in a.options[usual:] if o.fits))


def test_the_seeds_table():
    pick = lambda *a, **k: (advise(*a, **k).pick or type("none", (), {"method": "no fit"})).method
    assert pick("7b", "8GB", "llama.cpp") == "q4_k_m"                 # CPU -> GGUF Q4_K_M
    assert pick("13b", "24GB", "vllm") == "gptq-int4-g128"            # GPU serving -> GPTQ/AWQ int4
    assert pick("7b", "24GB", "vllm") == "rtn-fp8_e4m3-a8dyn"        # ... or FP8 with room to spare
    assert pick("7b", "48GB", "llama.cpp") is None                    # ... and the model as it is with plenty
    assert pick("13b", "24GB", "finetune") == "nf4"                   # fine-tune a quantised base -> QLoRA
    assert pick("7b", "80GB", "vllm", "max") is None                  # max quality: fp16 when it fits
    assert pick("70b", "8GB", "llama.cpp") == "no fit"                # says when nothing fits
    assert pick("70b", "24GB", "vllm") == "no fit"
    assert pick("70b", "48GB", "llama.cpp") == "q4_k_m"
    assert pick("70b", "30GB", "llama.cpp") == "q2_k"                 # only extreme compression fits
    assert pick("70b", "28GB", "transformers") == "quip"              # extreme compression -> 2-bit codebooks
    assert "Below 4 bits" in " ".join(advise("70b", "30GB", "llama.cpp").reasons)


@pytest.mark.parametrize("ftype,gib", [("q8_0", 6.7), ("q6_k", 5.15), ("q5_k_m", 4.45), ("q4_k_m", 3.80),
                                       ("q3_k_m", 3.06)])
def test_gguf_sizes_agree_with_llama_cpps_published_7b_table(ftype, gib):
    # llama.cpp's quantize README (LLaMA-7B): file sizes in GiB as llama-quantize wrote them, given to two
    # or three figures; llama.cpp has since moved a few Q3_K_M tensors, hence 0.02 GiB
    assert model_size(PRESET_SHAPES["7b"], ftype).bytes / GIB == pytest.approx(gib, abs=0.04 if ftype == "q8_0" else 0.02)


def test_presets_have_the_published_parameter_counts():
    assert PRESET_SHAPES["7b"].params == 6_738_415_616       # Llama-2-7B
    assert PRESET_SHAPES["13b"].params == 13_015_864_320     # Llama-2-13B
    assert PRESET_SHAPES["70b"].params == 68_976_648_192     # Llama-2-70B


def test_a_model_folder_is_read_from_its_config_alone(tmp_path):
    from tests.conftest import build_tiny_model, tiny_config

    tiny_config("llama").save_pretrained(tmp_path)
    a = advise(str(tmp_path), "1GB", "transformers", "max")
    assert a.params == sum(p.numel() for p in build_tiny_model("llama").parameters())
    assert "gptq-int4-g128" not in [o.method for o in a.options]    # g128 does not divide rows of 64
    assert a.pick.method is None                               # a tiny model fits at fp16
    tiny_config("mixtral").save_pretrained(tmp_path)
    with pytest.raises(LowbitError, match="mixture-of-experts"):
        advise(str(tmp_path), "1GB")


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["advise", "7b", "--memory", "lots"]) == 2
    assert main(["advise", str(tmp_path / "missing"), "--memory", "8GB"]) == 2
    assert main(["advise", "7b", "--memory", "8GB", "--target", "vllm", "--kv-cache", "int4"]) == 2
    assert main(["advise", "7b", "--memory", "8GB", "--context", "0"]) == 2
    assert main(["advise", "7b", "--memory", "8GB", "--target", "transformers", "--kv-cache", "int4-g0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("lowbit: error:") for line in err)
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("8") == 8e9
    with pytest.raises(LowbitError):
        parse_bytes("-3GB")


def test_cli_prints_the_pick_and_json(capsys):
    assert main(["advise", "7b", "--memory", "8GB"]) == 0
    out = capsys.readouterr().out
    assert "Q4_K_M GGUF" in out and "lowbit quantize MODEL --method q4_k_m" in out
    assert main(["advise", "70b", "--memory", "48GB", "--target", "transformers", "--kv-cache", "int4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kv_cache"] == "int4" and data["pick"]["method"] == "nf4"
    assert data["mix"]["total_bytes"] <= 48 * GB - data["reserve_bytes"] and "--budget" in data["mix_command"]
    assert main(["advise", "70b", "--memory", "48GB"]) == 0           # the mix beside the pick, with its command
    out = capsys.readouterr().out
    assert advise("70b", "48GB").mix_command in out and "budgeted mix at" in out


def test_measure_picks_from_measured_kl(monkeypatch, tmp_path):
    import importlib

    from lowbit.advisor_cli import measure
    from tests.conftest import tiny_config

    tiny_config("llama").save_pretrained(tmp_path)
    measured = {"fp16": (10.0, 0.0), "llm-int8": (10.01, 0.001), "nf4": (10.15, 0.015), "hqq-int3-g64": (10.5, 0.05),
                "quip": (12.0, 0.2)}
    compare_module = importlib.import_module("lowbit.eval.compare")
    monkeypatch.setattr(compare_module, "compare", _fake_compare(measured))
    monkeypatch.setattr(importlib.import_module("lowbit.api"), "load_model", lambda *a, **k: (None, "tokenizer"))
    balanced = measure(advise(str(tmp_path), "1GB", "transformers", "balanced"), str(tmp_path))
    assert balanced.pick.method == "nf4"           # the smallest within a 2% perplexity rise (KL <= log 1.02)
    assert "The most faithful option measured is fp16" in " ".join(balanced.reasons)
    best = measure(advise(str(tmp_path), "1GB", "transformers", "max"), str(tmp_path))
    assert best.pick.method is None and best.pick.perplexity == 10.0


def _fake_compare(results):
    """compare() answering from a table, keyed by method name (a Planned row by its name)."""
    def compare(rows, *a, **k):
        return [dict(zip(("perplexity", "kl"), results[getattr(r, "name", r)])) for r in rows]
    return compare


BUNDLED_MIX = ("0.5135GB", "llama.cpp")     # the bundled model's shape leaves headroom above Q6_K here


def test_measure_weighs_the_budgeted_mix(monkeypatch):
    """--measure quantises the budgeted mix beside the uniform options that fit, and picks it when it
    measures best; when it does not, the uniform pick stands and the mix is shown with its numbers."""
    import importlib

    from lowbit.advisor_cli import measure, render
    from lowbit.data import bundled_model_path

    path = str(bundled_model_path())
    offered = advise(path, *BUNDLED_MIX, "max")
    assert offered.pick.method == "q6_k" and offered.mix is not None
    mix_name = offered.mix.method
    recipes = []
    cli = importlib.import_module("lowbit.advisor_cli")
    monkeypatch.setattr(cli, "mix_recipe", lambda a, loaded, samples: recipes.append(a.mix.linear_bits) or "recipe")
    uniform = {"q6_k": (78.8, 6e-4), "q5_k_m": (78.7, 2e-3), "q4_k_m": (78.8, 8e-3), "q3_k_m": (78.7, 2e-2),
               "q2_k": (80.5, 9e-2)}
    compare_module = importlib.import_module("lowbit.eval.compare")
    monkeypatch.setattr(compare_module, "compare", _fake_compare({**uniform, mix_name: (78.6, 1e-4)}))
    best = measure(advise(path, *BUNDLED_MIX, "max"), path)
    assert recipes == [offered.mix.linear_bits]          # the recipe is made at the offered budget
    assert best.pick.kl == 1e-4 and best.mix is None
    assert best.command == offered.mix_command.replace(" --target", " --samples 16 --target")  # calibrates as measured
    assert "The pick is a budgeted mix" in " ".join(best.reasons) and offered.mix.label in render(best)
    # max picks the lowest KL even where perplexity, noisier, orders otherwise; a mix no more faithful
    # than the pick is shown with its numbers and not offered
    monkeypatch.setattr(compare_module, "compare", _fake_compare({**uniform, mix_name: (78.6, 7e-4)}))
    kept = measure(advise(path, *BUNDLED_MIX, "max"), path)
    assert kept.pick.method == "q6_k" and kept.command == offered.command
    assert kept.mix.perplexity == 78.6 and kept.mix_command is None
    assert "no more faithful than Q6_K GGUF" in " ".join(kept.reasons) and "78.6" in render(kept)
    # balanced: the smallest within a 2% perplexity rise (q3_k_m's KL 0.02 is above log 1.02); the mix,
    # more faithful than that pick, stays offered beside it
    balanced = measure(advise(path, *BUNDLED_MIX, "balanced"), path, samples=8)
    assert balanced.pick.method == "q4_k_m" and "--budget" in balanced.mix_command
    assert "--samples 8" in balanced.mix_command
    assert "a mix is more faithful than Q4_K_M GGUF (KL 0.0007 against 0.008)" in " ".join(balanced.reasons)
    assert "The most faithful option measured is Q6_K GGUF" in " ".join(balanced.reasons)
    # balanced takes the mix when nothing smaller is within the bound; the lowest KL when nothing is
    far = {n: (80.0 + i, 0.03 + i) for i, n in enumerate(uniform)}
    monkeypatch.setattr(compare_module, "compare", _fake_compare({**far, mix_name: (78.6, 1e-4)}))
    assert measure(advise(path, *BUNDLED_MIX, "balanced"), path).pick.kl == 1e-4
    monkeypatch.setattr(compare_module, "compare", _fake_compare({**far, mix_name: (90.0, 0.5)}))
    assert measure(advise(path, *BUNDLED_MIX, "balanced"), path).pick.method == "q6_k"


@pytest.mark.slow
def test_measure_picks_the_mix_on_the_bundled_model(capsys):
    """End to end: the mix's recipe from sensitivities on the bundled model, quantised and scored; at
    7.3 bits with Q8_0 for its most sensitive Linears it is more faithful than uniform Q6_K."""
    from lowbit.data import bundled_model_path

    assert main(["advise", str(bundled_model_path()), "--memory", BUNDLED_MIX[0], "--target", BUNDLED_MIX[1],
                 "--quality", "max", "--measure", "--samples", "8", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    q6 = next(o for o in a["options"] if o["method"] == "q6_k")
    assert a["pick"]["command"] and "--budget" in a["command"] and "--samples 8" in a["command"]
    assert a["pick"]["kl"] < q6["kl"]


@pytest.mark.slow
def test_measure_runs_on_the_bundled_model(capsys):
    from lowbit.data import bundled_model_path

    assert main(["advise", str(bundled_model_path()), "--memory", "1GB", "--target", "llama.cpp", "--measure",
                 "--samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "Measured on this model: perplexity" in out


def test_the_readme_table_is_what_the_advisor_says():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Which method? `lowbit advise`"):]
    rows = re.findall(r"^\| (\d+b) @ (\d+) GB +\|(.*)\|$", section, flags=re.M)
    assert len(rows) == 12
    for cls, gb, cells in rows:
        for target, cell in zip(("llama.cpp", "vllm", "transformers", "finetune"), cells.split("|")):
            a = advise(cls, f"{gb}GB", target)
            said = "will not fit" if a.pick is None else f"{a.pick.method or 'fp16'} ({a.pick.total_bytes / 1e9:.1f} GB)"
            assert cell.strip() == said, (cls, gb, target)


@pytest.mark.parametrize("cls", ["7b", "70b"])
@pytest.mark.parametrize("context,batch", [(4096, 1), (32768, 4)])
def test_the_reserve_is_the_engines_closed_form_with_a_floor(cls, context, batch):
    s = PRESET_SHAPES[cls]
    h, i, v, tokens = s.hidden, s.intermediate, s.vocab, context * batch
    u = min(512, tokens)     # llama.cpp's ubatch
    llama_cpp = max(4 * u * (3 * i + 4 * h) + 2 * u * tokens, 4 * u * (v + 2 * h)) + 4 * v * batch
    transformers = tokens * ((4 * h + 3 * i + 2 * s.head_dim) * 2 + 16)
    assert runtime_reserve(s, "llama.cpp", context, batch) == max(RESERVE_FLOOR, llama_cpp)
    assert runtime_reserve(s, "transformers", context, batch) == max(RESERVE_FLOOR, transformers)
    assert runtime_reserve(s, "vllm", context, batch) == runtime_reserve(s, "finetune", context, batch) == RESERVE_FLOOR
    if context == 32768:     # a long prefill outgrows the floor (llama.cpp's buffers, flash attention on, barely grow)
        assert runtime_reserve(s, "transformers", context, batch) > 10 * RESERVE_FLOOR


def mix_bytes(shape, bits, target) -> int:
    return mix_size(shape, bits, gguf_file_types(MIX_PLANS[target])).bytes


def assert_no_mix_is_right(a, shape, target, usable):
    """Why the advisor offers no mix, checked against the sizes."""
    p = a.pick
    if p is None or p.method is None:
        assert a.mix_reason == ("nothing fits" if p is None else "the fp16 model fits")
        return
    if target not in MIX_PLANS:
        assert a.mix_reason == NO_MIX[target]
        return
    larger = a.options[: a.options.index(p)]
    if any(o.fits for o in larger):
        assert a.mix_reason.startswith("a more precise uniform option fits")
        return
    room, plan = usable - p.other_bytes, MIX_PLANS[target]
    hundredth = lambda x: math.ceil(round(100 * x, 6)) / 100      # noqa: E731  (the next budget the command can say)
    if "largest candidate" in a.mix_reason:
        top = max(8 * model_size(shape, c).linear_bytes / shape.linear_params for c in candidates(plan))
        assert mix_bytes(shape, top, target) <= room               # every Linear at the top candidate fits
    elif "the headroom buys" in a.mix_reason:
        assert mix_bytes(shape, hundredth(p.linear_bits + MIX_MIN_GAIN), target) > room
    else:
        assert "below the smallest mix measured" in a.mix_reason
        assert mix_bytes(shape, plan.min_bits, target) > room


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("quality", ["max", "balanced"])
def test_a_mix_spends_the_headroom_and_its_size_is_the_calculators(target, quality):
    offered = 0
    for cls in CLASSES:
        shape = PRESET_SHAPES[cls]
        for gb in BUDGETS:
            a = advise(cls, f"{gb}GB", target, quality)
            usable = gb * GB * (VLLM_UTILISATION if target == "vllm" else 1) - a.reserve_bytes
            if a.mix is None:
                assert a.mix_command is None
                assert_no_mix_is_right(a, shape, target, usable)
                continue
            offered += 1
            p, bits = a.pick, a.mix.linear_bits
            i = a.options.index(p)
            assert i > 0 and not any(o.fits for o in a.options[:i])      # the most precise uniform option that fits
            larger = a.options[i - 1]
            assert a.mix.weight_bytes == mix_bytes(shape, bits, target)
            assert mix_size(shape, bits).linear_bytes == int(bits * shape.linear_params // 8)   # --budget <bits>bpw
            assert p.weight_bytes < a.mix.weight_bytes < larger.weight_bytes
            assert a.mix.total_bytes == a.mix.weight_bytes + p.other_bytes <= usable and a.mix.fits
            assert mix_bytes(shape, bits + 0.01, target) > usable - p.other_bytes   # the budget is the room
            assert bits >= max(p.linear_bits + MIX_MIN_GAIN, MIX_PLANS[target].min_bits)
            assert f"--budget {bits:.2f}bpw" in a.mix_command
            assert ("--format gguf" in a.mix_command) == (target == "llama.cpp")
            assert "Spend the headroom" in " ".join(a.reasons)
    assert (offered > 0) == (target in MIX_PLANS)


def test_the_readme_mix_table_is_what_the_advisor_says():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    said = set(re.findall(r"^\| (\d+b) @ (\d+) GB on (\S+) \(([a-z, ]+)\) \| (.*) \| (.*) \| (.*) \|$", text, flags=re.M))
    derived = set()
    for cls in CLASSES:
        for gb in BUDGETS:
            for target in TARGETS:
                cells = {}
                for quality in ("balanced", "max"):
                    a = advise(cls, f"{gb}GB", target, quality)
                    if a.mix:
                        larger = a.options[a.options.index(a.pick) - 1]
                        key = (f"{a.pick.method} ({a.pick.total_bytes / 1e9:.1f} GB)",
                               f"{a.mix.linear_bits:.2f} bpw ({a.mix.total_bytes / 1e9:.1f} GB)",
                               f"{larger.method or 'fp16'} ({larger.total_bytes / 1e9:.1f} GB)")
                        cells.setdefault(key, []).append(quality)
                derived |= {(cls, str(gb), target, ", ".join(q), *key) for key, q in cells.items()}
    assert said == derived and len(said) >= 3


def test_the_measurements_quoted_are_the_readmes():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Mixed precision under a budget"):text.index("## KV-cache quantisation")]
    for plan in MIX_PLANS.values():
        for row, bits, kl in plan.evidence:
            pattern = rf"^\| (\*\*)?{re.escape(row)}(\*\*)? \| {re.escape(bits)} \| [0-9.]+ \| {re.escape(kl)} \|"
            assert re.search(pattern, section, flags=re.M), row


@pytest.mark.slow
@pytest.mark.parametrize("target", ["llama.cpp", "transformers"])
def test_the_mix_command_stays_within_the_advised_size(target, tmp_path, one_thread):
    """The advised command run on a small model: what it writes is no larger than the advisor said."""
    import torch
    import transformers as t
    from gguf import GGUFReader

    from lowbit import api
    from lowbit.advisor import options, resolve_shape
    from lowbit.eval.memory import model_memory
    from tests.conftest import fp16_llama_folder

    folder = fp16_llama_folder(tmp_path / "hf")       # its tokenizer; a wider model with few embeddings
    torch.manual_seed(0)
    config = t.LlamaConfig(hidden_size=256, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, vocab_size=4096)
    t.LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    shape = resolve_shape(str(folder))
    opts = {o.method: o for o in options(shape, 1e12, target, 512, 1)}
    # between the pick and the next larger option, which must not fit (GGUF's embedding and head, sized at
    # their largest type, take a bigger share of this small model: the room must reach nearly Q6_K)
    below, above, share = {"llama.cpp": ("q5_k_m", "q6_k", 0.999), "transformers": ("nf4", "llm-int8", 0.5)}[target]
    room = opts[below].total_bytes + share * (opts[above].total_bytes - opts[below].total_bytes)
    memory = runtime_reserve(shape, target, 512, 1) + room
    a = advise(str(folder), memory, target, "max", context=512)
    assert a.pick.method == below and a.mix is not None, a.mix_reason
    quantize = a.mix_command.split(" && ")[0].split()[1:-2]
    out = tmp_path / "out"
    assert main(quantize + ["--samples", "4", "--seq-len", "64", "--quiet", "-o", str(out)]) == 0
    budget = int(a.mix.linear_bits * shape.linear_params // 8)
    if target == "llama.cpp":
        assert main(["export", str(out), "--format", "gguf", "--out", str(tmp_path / "mix.gguf")]) == 0
        tensors = GGUFReader(str(tmp_path / "mix.gguf")).tensors
        linears = sum(int(x.n_bytes) for x in tensors if x.name.startswith("blk.") and "norm" not in x.name)
        assert linears <= budget and sum(int(x.n_bytes) for x in tensors) <= a.mix.weight_bytes
        assert linears > a.pick.linear_bits * shape.linear_params / 8         # it spent the headroom
    else:
        model, _ = api.load_model(out)
        mem = model_memory(model)
        assert a.pick.linear_bits * shape.linear_params / 8 < mem.quantized_linear_bytes <= budget
        assert mem.quantized_linear_bytes + mem.other_bytes_at(2) <= a.mix.weight_bytes


def test_measure_refuses_bad_samples_before_any_work(capsys):
    from lowbit.data import bundled_model_path

    assert main(["advise", str(bundled_model_path()), "--memory", "1GB", "--measure", "--samples", "0"]) != 0
    err = capsys.readouterr().err
    assert "--samples must be at least 1" in err and "Traceback" not in err
