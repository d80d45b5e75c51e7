"""`python -m bench.report results.json > results.md`: benchmark JSON -> markdown.

Reads what run.py writes through harness.write_json(). Sections: the machine and the floors
measured in the same run; one summary table over all ops; per op, every row, then pykern's best
provider against torch per shape and dtype; a layout comparison wherever an op was run in more
than one layout (NCHW and NHWC inputs); errors and skipped providers. Plots are not drawn: the
tables carry everything (matplotlib is not needed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict

PROVIDER_ORDER = ("torch", "pykern-cpu", "pykern-cuda", "pykern-triton")


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _provider_key(name: str) -> tuple[int, str]:
    return (PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER), name)


def _header(doc: dict) -> list[str]:
    m, floors = doc["machine"], doc["floors"]
    commit = m.get("commit", "unknown") + (" (uncommitted changes)" if m.get("dirty") else "")
    lines = [
        f"# pykern benchmarks: {m.get('device_name', m.get('device'))}",
        "",
        f"- device: {m.get('device_name')} ({m.get('device')}); torch {m.get('torch')}, "
        f"CUDA {m.get('torch_cuda') or 'none'}, triton {m.get('triton')}, "
        f"pykern {m.get('pykern')} (backends: {', '.join(m.get('backends_compiled', []))})",
        f"- commit {commit}, {m.get('date')}; Python {m.get('python')}, "
        f"{m.get('cpu_threads')} CPU threads"
        + (f"; load average {m['load_average'][0]:.2f} at start" if m.get("load_average") else ""),
        "",
        "## Floors (measured in this run)",
        "",
    ]
    copy = floors["copy"]
    rows = [
        [
            f"copy bandwidth: dst.copy_(src), {copy['bytes'] // 2 >> 20} MiB each way",
            f"{copy['gbps']:.1f} GB/s (read + written)",
        ]
    ]
    for dtype, mm in floors.get("matmul", {}).items():
        rows.append([f"matmul: torch.mm, {mm['n']}^2, {dtype}", f"{mm['tflops']:.2f} TFLOP/s"])
    lines += _table(["floor", "value"], rows)
    if "matmul_allow_tf32" in floors:
        lines += [f"float32 matmul with TF32 allowed: {floors['matmul_allow_tf32']}", ""]
    return lines


def _best_pykern(rows: list[dict]) -> dict | None:
    ours = [r for r in rows if r["provider"] != "torch"]
    return min(ours, key=lambda r: r["time_ms"]) if ours else None


def _cells(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by (shape, dtype, layout), in first-seen order."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        cells[(tuple(r["shape"]), r["dtype"], r["layout"])].append(r)
    return cells


def _summary(by_op: dict[str, list[dict]]) -> list[str]:
    rows = []
    for op, records in by_op.items():
        ratios = []
        for cell in _cells(records).values():
            best = _best_pykern(cell)
            if best and best["ratio_vs_torch"]:
                ratios.append(best["ratio_vs_torch"])
        if not ratios:
            continue
        wins = sum(r > 1 for r in ratios)
        per_provider = defaultdict(list)
        for r in records:
            if r["provider"] != "torch" and r["ratio_vs_torch"]:
                per_provider[r["provider"]].append(r["ratio_vs_torch"])
        providers = ", ".join(
            f"{p} {_ratio(_geomean(v))}"
            for p, v in sorted(per_provider.items(), key=lambda kv: _provider_key(kv[0]))
        )
        rows.append(
            [
                op,
                str(len(ratios)),
                f"{wins}/{len(ratios)}",
                _ratio(_geomean(ratios)),
                f"{_ratio(min(ratios))} - {_ratio(max(ratios))}",
                providers,
            ]
        )
    header = [
        "op",
        "cases",
        "pykern faster",
        "best pykern vs torch (geomean)",
        "range",
        "per provider (geomean)",
    ]
    intro = "Ratio = torch time / pykern time, both from this run: above 1, pykern is faster."
    table = _table(header, rows) if rows else ["No pykern rows.", ""]
    return ["## Summary", "", intro, ""] + table


def _op_section(op: str, records: list[dict]) -> list[str]:
    family = records[0]["family"]
    lines = [f"## {op} ({family}, {records[0]['pass']})", ""]
    # CUDA runs time the GPU alone; the host's cost per call gets its own column there.
    host = any(r.get("host_us") is not None for r in records)
    rows = []
    for cell in _cells(records).values():
        for r in sorted(cell, key=lambda r: _provider_key(r["provider"])):
            row = [
                _shape(r["shape"]),
                r["dtype"],
                r["layout"],
                r["provider"],
                f"{r['time_ms']:.4f}",
                f"{r['time_min_ms']:.4f} - {r['time_max_ms']:.4f}",
                f"{r['gbps']:.1f}",
                f"{r['pct_of_floor']:.0f}%",
                _ratio(r["ratio_vs_torch"]),
            ]
            if host:
                row.append("-" if r.get("host_us") is None else f"{r['host_us']:.1f}")
            rows.append(row)
    header = ["shape", "dtype", "layout", "provider", "median ms", "min - max ms", "GB/s"]
    header += ["% of copy floor", "vs torch"] + (["host us/call"] if host else [])
    lines += _table(header, rows)

    lines += [f"### {op}: pykern's best against torch", ""]
    rows = []
    for (shape, dtype, layout), cell in _cells(records).items():
        torch_row = next((r for r in cell if r["provider"] == "torch"), None)
        best = _best_pykern(cell)
        if torch_row is None or best is None:
            continue
        ratio = best["ratio_vs_torch"]
        if not ratio:
            verdict = "-"
        elif abs(ratio - 1) < 0.03:  # within timing noise
            verdict = "even"
        elif ratio > 1:
            verdict = f"pykern {ratio:.2f}x faster"
        else:
            verdict = f"torch {1 / ratio:.2f}x faster"
        rows.append(
            [
                _shape(list(shape)),
                dtype,
                layout,
                f"{torch_row['time_ms']:.4f}",
                best["provider"],
                f"{best['time_ms']:.4f}",
                _ratio(ratio),
                verdict,
            ]
        )
    header = ["shape", "dtype", "layout", "torch ms", "best pykern", "ms", "vs torch", "verdict"]
    lines += _table(header, rows)
    lines += _layout_advice(op, records)
    return lines


def _layout_advice(op: str, records: list[dict]) -> list[str]:
    """Where one op ran on the same shape, dtype and provider in several layouts (NCHW and NHWC
    inputs), which layout was faster. Conversions (layout "a->b") are one layout each: none."""
    times: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in records:
        times[(tuple(r["shape"]), r["dtype"], r["provider"])][r["layout"]] = r["time_ms"]
    rows = []
    for (shape, dtype, provider), by_layout in times.items():
        if len(by_layout) < 2:
            continue
        ranked = sorted(by_layout.items(), key=lambda kv: kv[1])
        (fast, fast_ms), (_, slow_ms) = ranked[0], ranked[-1]
        cells = ", ".join(f"{k} {v:.4f}" for k, v in sorted(by_layout.items()))
        rows.append(
            [_shape(list(shape)), dtype, provider, cells, f"{fast} by {slow_ms / fast_ms:.2f}x"]
        )
    if not rows:
        return []
    return [f"### {op}: layout advice", ""] + _table(
        ["shape", "dtype", "provider", "ms per layout", "faster"], rows
    )


def _problems(doc: dict) -> list[str]:
    lines = []
    if doc.get("errors"):
        lines += ["## Errors (not timed)", ""]
        rows = [
            [e["op"], _shape(e["shape"]), e["dtype"], e["layout"], e["provider"], e["error"]]
            for e in doc["errors"]
        ]
        lines += _table(["op", "shape", "dtype", "layout", "provider", "error"], rows)
    if doc.get("skipped"):
        lines += ["## Providers skipped", ""]
        rows = [[s["family"], s["provider"], s["reason"]] for s in doc["skipped"]]
        lines += _table(["family", "provider", "why"], rows)
    return lines


def render(doc: dict) -> str:
    """The whole markdown report for one results.json document."""
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in doc["records"]:
        by_op[r["op"]].append(r)
    lines = _header(doc) + _summary(by_op)
    for op, records in by_op.items():
        lines += _op_section(op, records)
    lines += _problems(doc)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("results", help="a results.json written by python -m bench.run")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        sys.stdout.write(render(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
