"""`python -m pykern.bench compare OLD.json NEW.json`: every case both reports measured, old time
/ new time, flagged where the change is beyond the spread the reports themselves measured.

A case is (family, op, pass, shape, dtype, layout, provider). A change is flagged when both:
- the two runs' interquartile ranges of the repeats do not overlap (the change is bigger than
  the repeat-to-repeat spread of either run), and
- it is bigger than the run-to-run drift: the 90th percentile of |log(old / new)| over torch's
  own rows (code that did not change between the runs, where both ran the same torch version on
  the same device; without such rows, no drift allowance is made and the report says so).
Torch's rows are flagged by the first rule alone: they show what the machine did.
"""

from __future__ import annotations

import math

from pykern.bench.report import ms_str, shape_str, spread_pct, table

DRIFT_QUANTILE = 0.9


def key(r: dict) -> tuple:
    return (
        r["family"],
        r["op"],
        r.get("pass", "fwd"),
        tuple(r["shape"]),
        r["dtype"],
        r["layout"],
        r["provider"],
    )


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return 0.0
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def drift(old: dict, new: dict, pairs: list[tuple[dict, dict]]) -> tuple[float, str]:
    """(allowed |log ratio| for run-to-run drift, how it was found)."""
    same_torch = old["machine"].get("torch") == new["machine"].get("torch")
    same_device = old["machine"].get("device_name") == new["machine"].get("device_name")
    logs = [
        abs(math.log(a["time_ms"] / b["time_ms"]))
        for a, b in pairs
        if a["provider"].startswith("torch") and a["time_ms"] > 0 and b["time_ms"] > 0
    ]
    if not same_torch:
        return 0.0, "no drift allowance: the reports ran different torch versions"
    if not same_device:
        return 0.0, (
            f"no drift allowance: the reports ran on different devices "
            f"({old['machine'].get('device_name')}; {new['machine'].get('device_name')})"
        )
    if len(logs) < 5:
        return 0.0, f"no drift allowance: only {len(logs)} torch rows in common"
    allowed = _quantile(logs, DRIFT_QUANTILE)
    return allowed, (
        f"run-to-run drift allowance ±{100 * (math.exp(allowed) - 1):.1f}%: the "
        f"{int(DRIFT_QUANTILE * 100)}th percentile of torch's own {len(logs)} rows' change"
    )


def verdict(a: dict, b: dict, allowed_log: float) -> str:
    """'faster', 'slower' or '' for old record a, new record b."""
    q1a, q3a = a.get("time_q1_ms", a["time_ms"]), a.get("time_q3_ms", a["time_ms"])
    q1b, q3b = b.get("time_q1_ms", b["time_ms"]), b.get("time_q3_ms", b["time_ms"])
    separated = q3b < q1a or q3a < q1b
    if not separated or a["time_ms"] <= 0 or b["time_ms"] <= 0:
        return ""
    beyond_drift = abs(math.log(a["time_ms"] / b["time_ms"])) > allowed_log
    if not a["provider"].startswith("torch") and not beyond_drift:
        return ""
    return "faster" if b["time_ms"] < a["time_ms"] else "slower"


def compare(old: dict, new: dict) -> dict:
    """The comparison as data: rows (old, new, ratio, flag), unmatched counts, drift."""
    old_rows = {key(r): r for r in old["records"]}
    new_rows = {key(r): r for r in new["records"]}
    common = [k for k in old_rows if k in new_rows]
    pairs = [(old_rows[k], new_rows[k]) for k in common]
    allowed, how = drift(old, new, pairs)
    rows = []
    for k, (a, b) in zip(common, pairs, strict=True):
        ratio = a["time_ms"] / b["time_ms"] if b["time_ms"] > 0 else None
        rows.append({"key": k, "old": a, "new": b, "ratio": ratio, "flag": verdict(a, b, allowed)})
    return {
        "rows": rows,
        "only_old": [k for k in old_rows if k not in new_rows],
        "only_new": [k for k in new_rows if k not in old_rows],
        "drift_log": allowed,
        "drift_note": how,
    }


def _who(doc: dict, name: str) -> str:
    m = doc["machine"]
    commit = str(m.get("commit", "?"))[:12] + ("+" if m.get("dirty") else "")
    return (
        f"{name}: {m.get('device_name')}, torch {m.get('torch')}, commit {commit}, {m.get('date')}"
    )


def render(old: dict, new: dict, old_name: str = "old", new_name: str = "new") -> str:
    result = compare(old, new)
    rows = result["rows"]
    faster = [r for r in rows if r["flag"] == "faster"]
    slower = [r for r in rows if r["flag"] == "slower"]
    lines = [
        "# pykern benchmark comparison",
        "",
        f"- old: {_who(old, old_name)}",
        f"- new: {_who(new, new_name)}",
        f"- {len(rows)} cases in both; {len(result['only_old'])} only in old, "
        f"{len(result['only_new'])} only in new",
        f"- {result['drift_note']}",
        f"- flagged: {len(faster)} faster, {len(slower)} slower (interquartile ranges apart, and "
        "beyond the drift allowance for pykern's rows)",
        "",
        "Ratio = old time / new time: above 1, the new run is faster.",
        "",
    ]
    if old["machine"].get("device_name") != new["machine"].get("device_name"):
        lines += ["**The reports come from different devices.**", ""]

    def row(r: dict) -> list[str]:
        family, op, pass_, shape, dtype, layout, provider = r["key"]
        flag = {"faster": "**faster**", "slower": "**slower**"}.get(r["flag"], "")
        return [
            family,
            op,
            pass_,
            shape_str(shape),
            dtype,
            layout,
            provider,
            ms_str(r["old"]["time_ms"]),
            ms_str(r["new"]["time_ms"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
            f"±{spread_pct(r['old']):.1f}% / ±{spread_pct(r['new']):.1f}%",
            flag,
        ]

    header = ["family", "op", "pass", "shape", "dtype", "layout", "provider", "old ms", "new ms"]
    header += ["old/new", "IQR ± old / new", "change"]
    if faster or slower:
        lines += ["## Flagged changes", ""]
        flagged = sorted(faster + slower, key=lambda r: r["ratio"] or 0)
        lines += table(header, [row(r) for r in flagged])
    lines += ["## Every case", ""] + table(header, [row(r) for r in rows])
    if result["only_old"] or result["only_new"]:
        lines += ["## Cases in one report only", ""]
        for name, keys in ((old_name, result["only_old"]), (new_name, result["only_new"])):
            for k in keys[:200]:
                lines.append(
                    f"- only in {name}: {k[1]} {k[2]} {shape_str(k[3])} {k[4]} {k[5]} {k[6]}"
                )
            if len(keys) > 200:
                lines.append(f"- ... and {len(keys) - 200} more only in {name}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
