"""The comparison report: a text table, Markdown (table + protocol notes), JSON and a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path

from lowbit.errors import LowbitError

from lowbit.table import format_table

MIB = 1024 ** 2

# (header, how to read the cell from a row); None prints as "-"
COLUMNS = [
    ("Method", lambda r: r["method"]),
    ("Bits/weight", lambda r: r["bits_per_weight"]),
    ("Memory MiB", lambda r: r["memory_bytes"] / MIB),
    ("Linears/fp16", lambda r: r.get("quantized_linear_ratio")),
    ("Perplexity", lambda r: r["perplexity"]),
    ("dPPL", lambda r: r.get("delta_ppl")),
    ("KL", lambda r: r.get("kl")),
    ("Top-1 %", lambda r: None if r.get("top1") is None else 100 * r["top1"]),
    ("Prefill tok/s", lambda r: r.get("prefill_tokens_per_s")),
    ("Decode tok/s", lambda r: r.get("decode_tokens_per_s")),
    ("Quantise s", lambda r: r.get("quantize_s")),
]


def table(rows: list[dict], markdown: bool = False) -> str:
    """The comparison table; a column no row has a value for (e.g. speed with --no-speed) is left out."""
    columns = [(h, get) for h, get in COLUMNS if any(get(r) is not None for r in rows)]
    cells = [["-" if get(r) is None else get(r) for _, get in columns] for r in rows]
    return format_table([h for h, _ in columns], cells, markdown)


def notes(rows: list[dict]) -> list[str]:
    """The protocol behind the numbers (the same for every row of one comparison)."""
    first = rows[0]
    out = [f"Perplexity: {first['protocol']}."]
    if first.get("fidelity_protocol"):
        out.append(f"Fidelity: {first['fidelity_protocol']}, against the unquantised model "
                   f"(reference perplexity {first['reference_perplexity']:.4f}); dPPL = perplexity - reference.")
    out.append(f"Memory: {first['memory_protocol']}. Linears/fp16: the quantised Linears as held over the same "
               "Linears at fp16.")
    out.append("Bits/weight: storage bits of the quantised Linears (codes, scales, zeros; bias excluded) per "
               "weight; an unquantised row shows its storage precision.")
    if first.get("speed_protocol"):
        out.append(f"Speed: {first['speed_protocol']}; measured once on this machine, not a benchmark.")
    return out


def render_text(rows: list[dict]) -> str:
    return table(rows) + "\n\n" + "\n".join(notes(rows))


def render_markdown(rows: list[dict], title: str = "Quantisation comparison") -> str:
    return f"# {title}\n\n" + table(rows, markdown=True) + "\n\n" + "\n".join(f"- {n}" for n in notes(rows)) + "\n"


def render_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, default=str)


def plot_png(rows: list[dict]) -> bytes | None:
    """Perplexity against memory, one point per method named in the legend; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    markers = "osD^vP*Xhp<>"
    for i, r in enumerate(rows):  # a legend rather than text beside the points: close points overlap
        ax.scatter([r["memory_bytes"] / MIB], [r["perplexity"]], s=40, marker=markers[i % len(markers)],
                   label=f"{r['method']} ({r['bits_per_weight']:.3g} bits/weight)")
    if rows[0].get("reference_perplexity") is not None:
        ax.axhline(rows[0]["reference_perplexity"], color="grey", linestyle="--", linewidth=1,
                   label="unquantised reference")
    ax.set_xlabel("memory (MiB; quantised Linears as held, the other weights at fp16)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Perplexity against model size")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


REPORT_FILES = ("compare.md", "compare.json", "compare.png")


def check_report_out(out_dir) -> Path:
    """The report folder may be written: no earlier report in it (never overwritten), checked before work."""
    from lowbit.io.atomic import check_output

    out = Path(out_dir)
    if not out.exists():
        return check_output(out, "report folder")
    if not out.is_dir():
        raise LowbitError(f"--out {out} is a file, not a folder")
    old = [n for n in REPORT_FILES if (out / n).exists()]
    if old:
        raise LowbitError(f"{out / old[0]} already exists: remove the old report or choose another --out")
    return out


def write_report(rows: list[dict], out_dir) -> list[Path]:
    """compare.md, compare.json and compare.png (when matplotlib is present) in out_dir: a new folder is
    written whole or not at all; into an existing one, files written before a failure are removed."""
    from lowbit.io.atomic import atomic_output

    out = check_report_out(out_dir)
    png = plot_png(rows)
    files = {"compare.md": render_markdown(rows).encode(), "compare.json": (render_json(rows) + "\n").encode()}
    if png is not None:
        files["compare.png"] = png
    if not out.exists():
        with atomic_output(out, folder=True) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
        return [out / n for n in files]
    written = []
    try:
        for name, data in files.items():
            with atomic_output(out / name, folder=False) as tmp:
                tmp.write_bytes(data)
            written.append(out / name)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return written
