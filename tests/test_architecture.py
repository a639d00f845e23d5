"""The shape of the package: no import cycles, layers that only import downwards, small files, and an
`import lowbit` that loads no model library."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lowbit

SRC = Path(lowbit.__file__).parent
MAX_LINES = 400

# Each package may import only the packages listed for it (besides itself, errors and _version).
ALLOWED = {
    "formats": set(),
    "core": {"formats"},
    "weights": {"formats", "core"},
    "methods": {"formats", "core", "weights", "kernels"},
    "kernels": {"formats", "core", "weights"},
    "nn": {"formats", "core", "weights", "kernels"},
    "pipeline": {"formats", "core", "weights", "kernels", "methods", "nn", "data", "table", "units"},
}
NEVER_FROM_METHODS = ("lowbit.nn", "lowbit.pipeline", "lowbit.io", "lowbit.eval", "lowbit.train", "lowbit.api")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imported(path: Path, name: str, known: dict) -> set[str]:
    """Every lowbit module `path` imports, at any depth of the file (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.startswith("lowbit")}
    return out - {name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t in imported(path, name, known) if t in known} for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_layers_import_only_downwards():
    bad = []
    for name, targets in graph().items():
        layer = name.split(".")[1] if "." in name else None
        if layer not in ALLOWED or name.endswith(".cli"):   # command modules sit above every layer
            continue
        allowed = ALLOWED[layer] | {layer, "errors", "_version"}
        bad += [(name, t) for t in targets if t.split(".")[1] not in allowed]
    assert bad == []


def test_methods_never_import_nn_pipeline_or_io():
    g = graph()
    assert [(n, t) for n, ts in g.items() if n.startswith("lowbit.methods") for t in ts
            if t.startswith(NEVER_FROM_METHODS)] == []


def test_no_source_file_exceeds_the_limit():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_import_lowbit_stays_light():
    code = ("import sys, lowbit; heavy = [m for m in ('transformers', 'lowbit.pipeline', 'lowbit.io', 'lowbit.nn') "
            "if m in sys.modules]; assert not heavy, heavy; assert lowbit.GPTQ and lowbit.Recipe")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_public_api_names_every_method_and_entry_point():
    from lowbit.methods import METHODS

    for name in ("RTN", "GPTQ", "AWQ", "SmoothQuant", "W8A8", "LLMInt8", "NF4", "FP4", "GGMLQuant", "Recipe",
                 "QuantSpec", "quantize", "save", "load", "export", "evaluate", "compare", "parse_method"):
        assert getattr(lowbit, name) is not None, name
    exported = {getattr(lowbit, n) for n in lowbit.__all__ if isinstance(getattr(lowbit, n), type)}
    named = {c for c in METHODS.values() if not c.__name__.startswith("GGUF_")}
    assert named <= exported
