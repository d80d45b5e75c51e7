"""report.json -> PNG charts (matplotlib, when importable; it is not a dependency of pykern).

- family_<family>.png: per op and pass, grouped bars of the median time per shape, one bar per
  provider and layout (hatched: NHWC), whiskers from the fastest to the slowest repeat;
- attention_tflops.png: TFLOP/s over the sequence length, per head dim and pass, one line per
  provider (dashed: causal);
- attention_memory.png: extra memory over the sequence length (GPU runs);
- roofline.png: % of the floor per op, the median over its shapes, per provider;
- e2e_resnet50.png: images per second per provider and layout.

`python -m pykern.bench charts DIR` draws them later from DIR/report.json (a GPU machine
without matplotlib writes the json; another draws the charts).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from pykern.bench.report import by_op, family_key, flops_unit, provider_key, shape_str

COLORS = {
    "torch": "#7f7f7f",
    "torch-flash": "#4d4d4d",
    "torch-cudnn": "#a0a0a0",
    "torch-efficient": "#bcbd22",
    "torch-math": "#c7c7c7",
    "pykern-cpu": "#1f77b4",
    "pykern-cuda": "#2ca02c",
    "pykern-triton": "#d62728",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not importable here"
    return None


def render_all(doc: dict, out: Path) -> tuple[list[str], str | None]:
    """Draws every chart the report has data for into out: (file names, note or None). The
    note says why there are no charts, or which failed."""
    missing = matplotlib_missing()
    if missing:
        return [], f"skipped: {missing}; draw them later with `python -m pykern.bench charts {out}`"
    out = Path(out)
    files, failed = [], []
    families = sorted({r["family"] for r in doc["records"]}, key=family_key)
    jobs = [(f"family_{f}.png", _family, f) for f in families if f not in ("attention", "e2e")]
    jobs += [
        ("attention_tflops.png", _attention, None),
        ("attention_memory.png", _memory, None),
        ("roofline.png", _roofline, None),
        ("e2e_resnet50.png", _e2e, None),
    ]
    plt = _pyplot()
    for name, draw, arg in jobs:
        try:
            fig = draw(doc, arg) if arg is not None else draw(doc)
        except Exception as err:  # one chart must not cost the others
            failed.append(f"{name} ({type(err).__name__}: {err})")
            plt.close("all")
            continue
        if fig is None:
            continue
        fig.savefig(out / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    note = f"failed: {'; '.join(failed)}" if failed else None
    return files, note


def _grid(n: int, cols: int = 3, width: float = 5.5, height: float = 3.4):
    plt = _pyplot()
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _family(doc: dict, family: str):
    groups = {k: v for k, v in by_op(doc["records"]).items() if k[0] == family}
    if not groups:
        return None
    fig, axes = _grid(len(groups))
    for ax, ((_, op, pass_), records) in zip(axes, groups.items(), strict=True):
        # x: (shape, dtype); bars: (provider, layout)
        xs = list(dict.fromkeys((tuple(r["shape"]), r["dtype"]) for r in records))
        bars = sorted(
            {(r["provider"], r["layout"]) for r in records},
            key=lambda b: (b[1], provider_key(b[0])),
        )
        index = {(tuple(r["shape"]), r["dtype"], r["provider"], r["layout"]): r for r in records}
        width = 0.8 / max(len(bars), 1)
        for j, (provider, layout) in enumerate(bars):
            pos, heights, lo, hi = [], [], [], []
            for i, (shape, dtype) in enumerate(xs):
                r = index.get((shape, dtype, provider, layout))
                if r is None:
                    continue
                pos.append(i - 0.4 + width * (j + 0.5))
                heights.append(r["time_ms"])
                lo.append(r["time_ms"] - r["time_min_ms"])
                hi.append(r["time_max_ms"] - r["time_ms"])
            ax.bar(
                pos,
                heights,
                width,
                yerr=[lo, hi],
                color=COLORS.get(provider, "#9467bd"),
                hatch="//" if layout.startswith("nhwc") else None,
                edgecolor="white" if not layout.startswith("nhwc") else "black",
                linewidth=0.3,
                error_kw={"elinewidth": 0.6, "capsize": 1},
                label=f"{provider} {layout}",
            )
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(
            [f"{shape_str(s)}\n{d}" for s, d in xs],
            fontsize=7,
            rotation=25 if len(xs) > 3 else 0,
            ha="right" if len(xs) > 3 else "center",
        )
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(f"{op} ({pass_})", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{family}: time by layout and backend (lower is better)")
    fig.tight_layout()
    return fig


def _attention(doc: dict):
    records = [r for r in doc["records"] if r["family"] == "attention" and r.get("tflops")]
    if not records:
        return None
    panels = sorted({(r["dtype"], r["shape"][3], r["pass"]) for r in records})
    unit, scale = flops_unit(r["tflops"] for r in records)
    fig, axes = _grid(len(panels), cols=2, width=6.5, height=4)
    matmul = doc["floors"].get("matmul", {})
    for ax, (dtype, E, pass_) in zip(axes, panels, strict=True):
        lines = defaultdict(list)
        for r in records:
            if (r["dtype"], r["shape"][3], r["pass"]) == (dtype, E, pass_):
                lines[(r["provider"], r["op"] == "sdpa_causal")].append(
                    (r["shape"][2], r["tflops"] * scale)
                )
        for (provider, causal), points in sorted(
            lines.items(), key=lambda kv: provider_key(kv[0][0])
        ):
            points.sort()
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                markersize=3,
                linestyle="--" if causal else "-",
                color=COLORS.get(provider, "#9467bd"),
                label=f"{provider}{' causal' if causal else ''}",
            )
        if dtype in matmul:
            rate = matmul[dtype]["tflops"] * scale
            ax.axhline(rate, color="black", linewidth=0.6, linestyle=":")
            ax.text(ax.get_xlim()[0], rate, " matmul rate", fontsize=6, va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L = S")
        ax.set_ylabel(unit)
        ax.set_title(f"{dtype}, head dim {E}, {pass_}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"attention: {unit} over sequence length (higher is better)")
    fig.tight_layout()
    return fig


def _memory(doc: dict):
    rows = [r for r in doc.get("attention_memory") or [] if r.get("status") == "ok"]
    if not rows:
        return None
    passes = sorted({r["pass"] for r in rows})
    fig, axes = _grid(len(passes), cols=2, width=6, height=4)
    for ax, pass_ in zip(axes, passes, strict=True):
        lines = defaultdict(list)
        for r in rows:
            if r["pass"] == pass_:
                lines[r["provider"]].append((r["seq"], max(r["extra_bytes"], 1) / 2**20))
        for provider, points in sorted(lines.items(), key=lambda kv: provider_key(kv[0])):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    color=COLORS.get(provider, "#9467bd"), label=provider)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("extra MiB beyond inputs and outputs")
        ax.set_title(pass_, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("attention: peak extra memory (linear: x4 per x4 in length)")
    fig.tight_layout()
    return fig


def _roofline(doc: dict):
    groups = by_op(doc["records"])
    if not groups:
        return None
    labels, values = [], defaultdict(dict)
    for (family, op, pass_), records in groups.items():
        label = f"{family}: {op}{' (fwd+bwd)' if pass_ == 'fwdbwd' else ''}"
        labels.append(label)
        per_provider = defaultdict(list)
        for r in records:
            per_provider[r["provider"]].append(r["pct_of_floor"])
        for provider, pcts in per_provider.items():
            values[provider][label] = statistics.median(pcts)
    providers = sorted(values, key=provider_key)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(labels) * max(1, len(providers)) / 2 + 1.5))
    height = 0.8 / max(len(providers), 1)
    for j, provider in enumerate(providers):
        ys = [i - 0.4 + height * (j + 0.5) for i in range(len(labels))]
        xs = [values[provider].get(label, 0.0) for label in labels]
        ax.barh(ys, xs, height, color=COLORS.get(provider, "#9467bd"), label=provider)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.axvline(100, color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel("% of the floor measured in this run (median over shapes; 100% = at the floor)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("% of roofline per op")
    fig.tight_layout()
    return fig


def _e2e(doc: dict):
    records = [r for r in doc["records"] if r["family"] == "e2e"]
    if not records:
        return None
    groups = list(dict.fromkeys((r["pass"], r["dtype"]) for r in records))
    bars = sorted(
        {(r["provider"], r["layout"]) for r in records}, key=lambda b: (b[1], provider_key(b[0]))
    )
    index = {(r["pass"], r["dtype"], r["provider"], r["layout"]): r for r in records}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.5 + 2 * len(groups), 4))
    width = 0.8 / max(len(bars), 1)
    for j, (provider, layout) in enumerate(bars):
        pos, heights = [], []
        for i, (pass_, dtype) in enumerate(groups):
            r = index.get((pass_, dtype, provider, layout))
            if r is None:
                continue
            pos.append(i - 0.4 + width * (j + 0.5))
            heights.append(r["shape"][0] / (r["time_ms"] * 1e-3))
        ax.bar(pos, heights, width, color=COLORS.get(provider, "#9467bd"),
               hatch="//" if layout == "nhwc" else None, edgecolor="black", linewidth=0.3,
               label=f"{provider} {layout}")  # fmt: skip
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{p}\n{d}" for p, d in groups])
    ax.set_ylabel("images / s")
    shape = records[0]["shape"]
    ax.set_title(f"ResNet-50, batch {shape[0]}, {shape[2]}x{shape[3]} (higher is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
