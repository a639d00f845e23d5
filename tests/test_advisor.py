"""The advisor: its table for 7B/13B/70B classes at 8/24/48/80 GB, sizes that are the calculators', sizes
against llama.cpp's published file sizes, and its refusals."""
import json

import pytest

from lowbit.advisor import BALANCED_SHARE, PRESET_SHAPES, RESERVE_BYTES, TARGETS, VLLM_UTILISATION, advise, parse_bytes
from lowbit.calc import GB, GIB, kv_cache_memory, model_size
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
            usable = gb * GB * (VLLM_UTILISATION if target == "vllm" else 1) - RESERVE_BYTES
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


def test_measure_picks_from_measured_perplexity(monkeypatch, tmp_path):
    import importlib

    from lowbit.advisor_cli import measure
    from tests.conftest import tiny_config

    tiny_config("llama").save_pretrained(tmp_path)
    ppl = {"fp16": 10.0, "llm-int8": 10.01, "nf4": 10.15, "hqq-int3-g64": 10.5, "quip": 12.0}
    compare_module = importlib.import_module("lowbit.eval.compare")
    monkeypatch.setattr(compare_module, "compare", lambda names, *a, **k: [{"perplexity": ppl[n]} for n in names])
    balanced = measure(advise(str(tmp_path), "1GB", "transformers", "balanced"), str(tmp_path))
    assert balanced.pick.method == "nf4"           # the smallest within 2% of the best measured
    best = measure(advise(str(tmp_path), "1GB", "transformers", "max"), str(tmp_path))
    assert best.pick.method is None and best.pick.perplexity == 10.0


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
