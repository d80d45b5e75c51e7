"""report.json -> report.md.

Sections: the machine, the run and the floors measured in it; the charts (or why there are
none); a summary over ops; layout advice (per op and shape, which layout wins for torch and for
pykern, by how much, against the rule of thumb "NCHW on GPU, NHWC on CPU"); attention's
TFLOP/s over sequence length and peak memory; the end-to-end ResNet-50 in images per second;
then per op every measured row; errors and skipped providers last. Every number comes from the
report.json, which keeps every repeat. Reads schema 1 (`python -m bench.run`'s results.json)
too, through harness.load_json.
"""

from __future__ import annotations

import math
from collections import defaultdict

PROVIDER_ORDER = (
    "torch",
    "torch-flash",
    "torch-cudnn",
    "torch-efficient",
    "torch-math",
    "pykern-cpu",
    "pykern-cuda",
    "pykern-triton",
)
FAMILY_ORDER = ("layout", "pooling", "norm", "conv", "attention", "e2e")


def shape_str(shape) -> str:
    return "x".join(map(str, shape))


def ratio_str(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def ms_str(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.4f}" if ms < 10 else f"{ms:.2f}"


def flops_unit(tflops_values) -> tuple[str, float]:
    """("TFLOP/s", 1) or, where every rate is under 1 TFLOP/s (a CPU), ("GFLOP/s", 1000)."""
    values = [v for v in tflops_values if v]
    return ("TFLOP/s", 1.0) if values and max(values) >= 1 else ("GFLOP/s", 1e3)


def flops_str(tflops: float) -> str:
    return f"{tflops:.3g} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.3g} GFLOP/s"


def geomean(values) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def spread_pct(r: dict) -> float:
    """Half the interquartile range of the repeats, as a percentage of the median."""
    q1, q3 = r.get("time_q1_ms", r["time_ms"]), r.get("time_q3_ms", r["time_ms"])
    return 50.0 * (q3 - q1) / r["time_ms"] if r["time_ms"] > 0 else 0.0


def overlaps(a: dict, b: dict) -> bool:
    """True when the interquartile ranges of two records overlap: not told apart by this run."""
    return not (a["time_q3_ms"] < b["time_q1_ms"] or b["time_q3_ms"] < a["time_q1_ms"])


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def provider_key(name: str) -> tuple[int, str]:
    return (PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER), name)


def family_key(name: str) -> int:
    return FAMILY_ORDER.index(name) if name in FAMILY_ORDER else len(FAMILY_ORDER)


def is_pykern(r: dict) -> bool:
    return r["provider"].startswith("pykern")


def by_op(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by (family, op, pass), families in their order, ops first-seen."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["family"], r["op"], r["pass"])].append(r)
    return dict(sorted(groups.items(), key=lambda kv: family_key(kv[0][0])))


def cells(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by (shape, dtype, layout), in first-seen order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(tuple(r["shape"]), r["dtype"], r["layout"])].append(r)
    return groups


def best_pykern(rows: list[dict]) -> dict | None:
    ours = [r for r in rows if is_pykern(r)]
    return min(ours, key=lambda r: r["time_ms"]) if ours else None


def op_title(family: str, op: str, pass_: str) -> str:
    return f"{op} ({family}, {'forward+backward' if pass_ == 'fwdbwd' else 'forward'})"


# ---------------------------------------------------------------- header, floors, charts


def _machine(doc: dict) -> list[str]:
    m, s = doc["machine"], doc.get("settings", {})
    commit = str(m.get("commit", "unknown")) + (" (uncommitted changes)" if m.get("dirty") else "")
    device = m.get("device_name", m.get("device"))
    if m.get("device") == "cuda":
        device += f" (sm {m.get('capability', '?')}, {m.get('sm_count', '?')} SMs"
        device += (
            f", {m.get('gpu_memory_bytes', 0) / 2**30:.0f} GiB)"
            if m.get("gpu_memory_bytes")
            else ")"
        )
    torch_text = f"{m.get('torch')} (CUDA {m.get('torch_cuda') or 'none: CPU build'}"
    torch_text += f", cuDNN {m['cudnn']})" if m.get("cudnn") else ")"
    pykern_text = f"{m.get('pykern')} (backends compiled: "
    pykern_text += ", ".join(m.get("backends_compiled", []))
    pykern_text += f"; CUDA archs {', '.join(m['cuda_archs'])})" if m.get("cuda_archs") else ")"
    cpu_text = f"{m.get('cpu')}, {m.get('cpu_threads')} threads"
    if m.get("load_average"):
        cpu_text += f", load average {m['load_average'][0]:.2f} at start"
    rows = [
        ["device", device],
        ["torch", torch_text],
        ["triton", str(m.get("triton"))],
        ["pykern", pykern_text],
        ["commit", commit],
        ["date", str(m.get("date"))],
        ["CPU", cpu_text],
        ["Python", f"{m.get('python')} on {m.get('platform')}"],
    ]
    if s:
        duration = s.get("duration_s")
        rows.append(["command", f"`{' '.join(doc.get('argv') or ['python -m pykern.bench'])}`"])
        timing = s.get("timing", {})
        rows.append(
            [
                "run",
                f"{'quick' if s.get('quick') else 'full'} sizes; {duration:.0f} s "
                f"(target {s.get('target_s', 0):.0f} s); at least {timing.get('min_repeats')} "
                f"repeats per provider, interleaved, up to {timing.get('budget_s')} s per case",
            ]
        )
        warmed = s.get("prewarm")
        if warmed:
            rows.append(
                [
                    "compiled first",
                    f"{warmed['cases']} of {warmed['of']} cases in {warmed['workers']} worker "
                    f"processes, {warmed['seconds']:.0f} s; {len(warmed['errors'])} raised there",
                ]
            )
    title = f"# pykern benchmark report: {m.get('device_name', m.get('device'))}"
    lines = [title, ""]
    if doc.get("partial"):
        lines += [
            "**Partial report**: written after a family finished; the run went on (or was cut "
            "off) after it.",
            "",
        ]
    return lines + table(["", ""], rows)


def _floors(doc: dict) -> list[str]:
    floors = doc["floors"]
    copy = floors["copy"]

    def spread(f: dict) -> str:
        if "min_ms" in f and "max_ms" in f:
            return (
                f"{ms_str(f['min_ms'])} - {ms_str(f['max_ms'])} ms over {f.get('repeats')} repeats"
            )
        return "-"

    rows = [
        [
            f"copy bandwidth: dst.copy_(src), {copy['bytes'] // 2 >> 20} MiB each way",
            f"{copy['gbps']:.1f} GB/s (read + written)",
            spread(copy),
        ]
    ]
    for dtype, mm in floors.get("matmul", {}).items():
        rows.append(
            [
                f"matmul: torch.mm, {mm['n']}x{mm['n']}, {dtype}",
                flops_str(mm["tflops"]),
                spread(mm),
            ]
        )
    lines = ["## Floors (measured in this run)", ""]
    lines += table(["floor", "value", "spread (min - max)"], rows)
    if "matmul_allow_tf32" in floors:
        lines += [f"float32 matmul with TF32 allowed: {floors['matmul_allow_tf32']}.", ""]
    lines += [
        "An op's floor is its bytes at the copy bandwidth, or its FLOPs at the dtype's matmul "
        'rate, whichever takes longer; "% of floor" is floor time / measured time.',
        "",
    ]
    return lines


def _reading() -> list[str]:
    return [
        "## How to read it",
        "",
        "- median ms: median over repeats of the time per call (CUDA events on a GPU, wall clock "
        "on a CPU); inputs are rotated across enough copies to exceed the last-level cache; "
        "providers are timed interleaved in the same process.",
        "- spread: half the interquartile range of the repeats as a share of the median "
        "(IQR ±), and the fastest and slowest repeat; every repeat is in report.json.",
        "- vs torch: torch's median / this median in the same run (above 1: faster than torch). "
        "For attention the reference is torch's flash backend where it runs (else the first "
        "torch backend that does).",
        "- two times are told apart only where their interquartile ranges do not overlap; "
        'otherwise the tables say "within spread".',
        "- host us/call (GPU): the host's time to enqueue one call while the GPU is kept busy. "
        '"≤" marks a call that launches more kernels than CUDA\'s launch queue holds, so that '
        "enqueueing it waited on the GPU: an upper bound.",
        "",
    ]


def _charts(charts: list[str] | None, note: str | None) -> list[str]:
    lines = ["## Charts", ""]
    if charts:
        lines += [f"![{name}]({name})" for name in charts] + [""]
    if note:
        lines += [f"Charts: {note}", ""]
    if not charts and not note:
        lines += ["No charts.", ""]
    return lines


# ---------------------------------------------------------------- summary, layout advice


def _summary(groups: dict[tuple, list[dict]]) -> list[str]:
    rows = []
    for (family, op, pass_), records in groups.items():
        if family == "e2e":
            continue
        ratios = []
        for cell in cells(records).values():
            best = best_pykern(cell)
            if best and best.get("ratio_vs_torch"):
                ratios.append(best["ratio_vs_torch"])
        per_provider = defaultdict(list)
        for r in records:
            if is_pykern(r) and r.get("ratio_vs_torch"):
                per_provider[r["provider"]].append(r["ratio_vs_torch"])
        if not ratios:
            continue
        pct = [r["pct_of_floor"] for r in records if is_pykern(r)]
        rows.append(
            [
                family,
                op,
                pass_,
                f"{sum(r > 1 for r in ratios)}/{len(ratios)}",
                ratio_str(geomean(ratios)),
                f"{ratio_str(min(ratios))} - {ratio_str(max(ratios))}",
                ", ".join(
                    f"{p} {ratio_str(geomean(v))}"
                    for p, v in sorted(per_provider.items(), key=lambda kv: provider_key(kv[0]))
                ),
                f"{max(pct):.0f}%" if pct else "-",
            ]
        )
    header = [
        "family",
        "op",
        "pass",
        "pykern faster",
        "best pykern vs torch (geomean)",
        "range",
        "per provider (geomean)",
        "best % of floor",
    ]
    intro = "Ratio = torch time / pykern time, both from this run: above 1, pykern is faster."
    return ["## Summary", "", intro, ""] + (
        table(header, rows) if rows else ["No pykern rows.", ""]
    )


def _winner(a: dict | None, b: dict | None) -> tuple[str, str]:
    """('nchw' | 'nhwc' | 'even' | '-', 'by 1.23x' text) for NCHW record a, NHWC record b."""
    if a is None or b is None:
        return "-", "-"
    fast, slow = (a, b) if a["time_ms"] <= b["time_ms"] else (b, a)
    factor = slow["time_ms"] / fast["time_ms"]
    if overlaps(a, b):
        return "even", f"{factor:.2f}x, within spread"
    return fast["layout"], f"{factor:.2f}x"


def layout_advice(doc: dict) -> tuple[list[list[str]], dict]:
    """Rows of the layout-advice table, and counts of how the rule of thumb fared."""
    device = doc["machine"].get("device", "cpu")
    expected = "nchw" if device == "cuda" else "nhwc"
    rows, counts = [], defaultdict(lambda: [0, 0])  # who -> [held, decided]
    for (_, op, pass_), records in by_op(doc["records"]).items():
        by_cell: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            if r["layout"] in ("nchw", "nhwc"):
                by_cell[(tuple(r["shape"]), r["dtype"])][r["layout"]].append(r)
        for (shape, dtype), layouts in by_cell.items():
            if len(layouts) < 2:
                continue
            torch_n = next((r for r in layouts["nchw"] if r["provider"] == "torch"), None)
            torch_h = next((r for r in layouts["nhwc"] if r["provider"] == "torch"), None)
            pk_n, pk_h = best_pykern(layouts["nchw"]), best_pykern(layouts["nhwc"])
            t_win, t_by = _winner(torch_n, torch_h)
            p_win, p_by = _winner(pk_n, pk_h)
            verdicts = []
            for who, win in (("torch", t_win), ("pykern", p_win)):
                if win in ("nchw", "nhwc"):
                    counts[who][1] += 1
                    counts[who][0] += win == expected
                    verdicts.append(f"{who}: {'holds' if win == expected else 'fails'}")
                elif win == "even":
                    verdicts.append(f"{who}: even")
            pk_cells = "-"
            if pk_n and pk_h:
                pk_cells = (
                    f"{ms_str(pk_n['time_ms'])} ({pk_n['provider'].removeprefix('pykern-')}) / "
                    f"{ms_str(pk_h['time_ms'])} ({pk_h['provider'].removeprefix('pykern-')})"
                )
            rows.append(
                [
                    op,
                    pass_,
                    shape_str(shape),
                    dtype,
                    f"{ms_str(torch_n and torch_n['time_ms'])} / "
                    f"{ms_str(torch_h and torch_h['time_ms'])}",
                    f"**{t_win}** {t_by}" if t_win not in ("-", "even") else f"{t_win} ({t_by})",
                    pk_cells,
                    f"**{p_win}** {p_by}" if p_win not in ("-", "even") else f"{p_win} ({p_by})",
                    "; ".join(verdicts) or "-",
                ]
            )
    return rows, counts


def _layout_section(doc: dict) -> list[str]:
    rows, counts = layout_advice(doc)
    if not rows:
        return []
    device = doc["machine"].get("device", "cpu")
    rule = "NCHW on GPU" if device == "cuda" else "NHWC on CPU"
    lines = [
        "## Layout advice",
        "",
        f"Per op and shape, the faster input layout for torch and for pykern's fastest backend, "
        f'measured in this run, checked against the rule of thumb ({rule}). "even": the two '
        "layouts' interquartile ranges overlap.",
        "",
    ]
    for who in ("torch", "pykern"):
        held, decided = counts[who]
        if decided:
            lines.append(
                f"- {who}: the rule of thumb held in {held} of the {decided} cases where one "
                "layout was faster beyond the spread."
            )
    lines.append("")
    header = [
        "op",
        "pass",
        "shape",
        "dtype",
        "torch ms NCHW / NHWC",
        "torch: faster",
        "pykern ms NCHW / NHWC (backend)",
        "pykern: faster",
        f"rule of thumb ({rule})",
    ]
    return lines + table(header, rows)


# ---------------------------------------------------------------- attention, end to end


def _attention(doc: dict) -> list[str]:
    records = [r for r in doc["records"] if r["family"] == "attention"]
    section = doc.get("sections", {}).get("attention")
    if not records and not section:
        return []
    lines = ["## Attention: FLOP/s over sequence length", ""]
    if section and section.get("status") == "skipped":
        return lines + [f"Not run: {section.get('reason')}.", ""]
    providers = sorted({r["provider"] for r in records}, key=provider_key)
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        B, H, L, E = r["shape"]
        key = (r["dtype"], E, r["op"] == "sdpa_causal", r["pass"], L, B, H)
        groups[key][r["provider"]] = r
    matmul = doc["floors"].get("matmul", {})
    intro = (
        "FLOPs 4*B*H*L*S*E forward (halved when causal), x3.5 forward+backward; "
        "batch x sequence = 16k tokens on a GPU. "
    )
    if matmul:
        intro += (
            "Matmul rate in this run: "
            + ", ".join(f"{k} {flops_str(v['tflops'])}" for k, v in matmul.items())
            + "."
        )
    unit, scale = flops_unit(r.get("tflops") for r in records)
    rows = []
    for key in sorted(groups):
        dtype, E, causal, pass_, L, B, H = key
        cell = groups[key]
        row = [dtype, str(E), "yes" if causal else "no", pass_, str(L), f"{B}x{H}"]
        for p in providers:
            r = cell.get(p)
            row.append("-" if r is None or not r.get("tflops") else f"{r['tflops'] * scale:.1f}")
        best = best_pykern(list(cell.values()))
        row.append(ratio_str(best and best.get("ratio_vs_torch")))
        rows.append(row)
    header = ["dtype", "head dim", "causal", "pass", "L = S", "B x H"]
    header += [f"{p} {unit}" for p in providers]
    reference = next((r.get("reference", "torch") for r in records), "torch")
    header.append(f"best pykern vs {reference}")
    lines += [intro, ""] + table(header, rows)
    lines += _memory(doc, section)
    return lines


def _memory(doc: dict, section: dict | None) -> list[str]:
    rows_in = doc.get("attention_memory") or []
    lines = ["### Attention: peak memory", ""]
    if not rows_in:
        note = (section or {}).get("memory") or "not measured in this run"
        return lines + [note[0].upper() + note[1:] + ".", ""]
    seqs = sorted({r["seq"] for r in rows_in})
    table_rows = defaultdict(dict)
    for r in rows_in:
        key = (r["pass"], r["provider"])
        if r["status"] == "ok":
            text = f"{r['extra_bytes'] / 2**20:.0f} ({r['peak_bytes'] / 2**20:.0f})"
        else:
            text = r["status"]
        table_rows[key][r["seq"]] = text
    rows = [
        [pass_, provider] + [cells_.get(L, "-") for L in seqs]
        for (pass_, provider), cells_ in sorted(
            table_rows.items(), key=lambda kv: (kv[0][0], provider_key(kv[0][1]))
        )
    ]
    first = rows_in[0]
    lines += [
        f"One call, batch 1, {first['heads']} heads of {first['head_dim']}, {first['dtype']}, not "
        "causal: MiB beyond the inputs and outputs (peak MiB allocated during the call, "
        "torch.cuda.max_memory_allocated). Linear memory grows 4x from 4k to 16k and 16k to 64k; "
        "a materialized score matrix grows 16x.",
        "",
    ]
    lines += table(["pass", "provider"] + [f"L = {L}" for L in seqs], rows)
    reasons = {(r["provider"], r.get("reason")) for r in rows_in if r["status"] != "ok"}
    lines += [f"- {p}: {why}" for p, why in sorted(reasons) if why] + [""]
    return lines


def _e2e(doc: dict) -> list[str]:
    records = [r for r in doc["records"] if r["family"] == "e2e"]
    section = doc.get("sections", {}).get("e2e")
    if not records and not section:
        return []
    lines = ["## End to end: ResNet-50", ""]
    if section and section.get("status") == "skipped":
        return lines + [f"Skipped: {section.get('reason')}.", ""]
    if not records:
        return lines + ["No end-to-end case ran (see Errors).", ""]
    lines += [
        "Images per second (batch / median time). Forward: eval mode, no grad; forward+backward: "
        "train mode, the parameters' gradients. pykern: the same model (same weights) after "
        "pykern.convert, under each backend. Ratio: against torch's NCHW model.",
        "",
    ]
    groups: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for r in records:
        groups[(r["pass"], r["dtype"], tuple(r["shape"]))][(r["provider"], r["layout"])] = r
    columns = sorted(
        {k for g in groups.values() for k in g}, key=lambda k: (provider_key(k[0]), k[1])
    )
    rows = []
    for (pass_, dtype, shape), cell in groups.items():
        base = cell.get(("torch", "nchw"))
        row = [pass_, dtype, f"{shape[0]} x {shape[2]}x{shape[3]}"]
        for key in columns:
            r = cell.get(key)
            if r is None:
                row.append("-")
                continue
            ips = shape[0] / (r["time_ms"] * 1e-3)
            ratio = f" ({base['time_ms'] / r['time_ms']:.2f}x)" if base and r is not base else ""
            row.append(f"{ips:.1f}{ratio} ±{spread_pct(r):.0f}%")
        rows.append(row)
    header = ["pass", "dtype", "batch x image"] + [f"{p} {lay.upper()}" for p, lay in columns]
    lines += table(header, rows)
    diffs = [
        (r["pass"], r["layout"], r["provider"], r["extra"]["rel_diff_vs_torch"])
        for r in records
        if is_pykern(r) and "rel_diff_vs_torch" in r.get("extra", {})
    ]
    if diffs:
        worst = max(diffs, key=lambda d: d[3])
        lines += [
            f"Converted model's output against the stock model's (relative norm): at most "
            f"{worst[3]:.2g} ({worst[2]}, {worst[0]}, {worst[1]}).",
            "",
        ]
    summary = (section or {}).get("convert_summary")
    if summary:
        first_key, first = next(iter(summary.items()))
        text = first.get("text") if isinstance(first, dict) else None
        text = text if text is not None else str(first)
        lines += [f"pykern.convert's summary ({first_key}):", "", "```", text.rstrip(), "```", ""]
    return lines


# ---------------------------------------------------------------- per op


def host_str(r: dict) -> str:
    """A record's host us/call; "≤" where it waited on a full launch queue (an upper bound)."""
    if r.get("host_us") is None:
        return "-"
    return ("≤" if r.get("host_us_upper_bound") else "") + f"{r['host_us']:.1f}"


def _op_section(family: str, op: str, pass_: str, records: list[dict]) -> list[str]:
    lines = [f"#### {op_title(family, op, pass_)}", ""]
    host = any(r.get("host_us") is not None for r in records)
    compute = any(r.get("flops") for r in records)
    unit, scale = flops_unit(r.get("tflops") for r in records)
    reference = records[0].get("reference", "torch")
    rows = []
    for cell in cells(records).values():
        for r in sorted(cell, key=lambda r: provider_key(r["provider"])):
            if compute and r.get("tflops"):
                rate = f"{r['tflops'] * scale:.3g}"
            else:
                rate = f"{r['gbps']:.3g}"
            row = [
                shape_str(r["shape"]),
                r["dtype"],
                r["layout"],
                r["provider"],
                ms_str(r["time_ms"]),
                f"±{spread_pct(r):.1f}%",
                f"{ms_str(r['time_min_ms'])} - {ms_str(r['time_max_ms'])}",
                rate,
                f"{r['pct_of_floor']:.0f}%",
                ratio_str(r.get("ratio_vs_torch")),
            ]
            if host:
                row.append(host_str(r))
            rows.append(row)
    header = ["shape", "dtype", "layout", "provider", "median ms", "IQR ±", "min - max ms"]
    header += [unit if compute else "GB/s", "% of floor", f"vs {reference}"]
    header += ["host us/call"] if host else []
    return lines + table(header, rows)


def _details(groups: dict[tuple, list[dict]]) -> list[str]:
    lines = ["## Every measurement, per op", ""]
    family = None
    for (fam, op, pass_), records in groups.items():
        if fam != family:
            lines += [f"### {fam}", ""]
            family = fam
        lines += _op_section(fam, op, pass_, records)
    return lines


def _problems(doc: dict) -> list[str]:
    lines = []
    if doc.get("errors"):
        lines += ["## Errors (not timed)", ""]
        rows = [
            [
                e.get("family", "-"),
                e["op"],
                e.get("pass", "fwd"),
                shape_str(e["shape"]),
                e["dtype"],
                e["layout"],
                e["provider"],
                e["error"].replace("|", "/").replace("\n", " "),
            ]
            for e in doc["errors"]
        ]
        lines += table(
            ["family", "op", "pass", "shape", "dtype", "layout", "provider", "error"], rows
        )
    if doc.get("skipped"):
        lines += ["## Providers skipped", ""]
        rows = [[s["family"], s["provider"], s["reason"].replace("|", "/")] for s in doc["skipped"]]
        lines += table(["family", "provider", "why"], rows)
    if doc.get("not_run"):
        counts: dict[str, int] = defaultdict(int)
        for e in doc["not_run"]:
            counts[f"{e.get('family', '-')} {e['op']}"] += 1
        lines += [
            "## Cases not run (the run reached its time limit)",
            "",
            f"{len(doc['not_run'])} cases: "
            + ", ".join(f"{name} ({n})" for name, n in counts.items())
            + ". A longer --minutes, or fewer --ops, runs them.",
            "",
        ]
    sections = doc.get("sections", {})
    skipped_sections = [(f, s) for f, s in sections.items() if s.get("status") == "skipped"]
    if skipped_sections:
        lines += ["## Sections not run", ""]
        lines += [f"- {f}: {s.get('reason')}" for f, s in skipped_sections] + [""]
    return lines


def render(doc: dict, charts: list[str] | None = None, charts_note: str | None = None) -> str:
    """The whole markdown report for one report.json document."""
    groups = by_op(doc["records"])
    lines = _machine(doc) + _floors(doc) + _reading() + _charts(charts, charts_note)
    lines += _summary(groups) + _layout_section(doc) + _attention(doc) + _e2e(doc)
    lines += _details(groups) + _problems(doc)
    return "\n".join(lines).rstrip() + "\n"
