"""`python -m bench.run`: measure the floors, then every case of the chosen families, then write
results.json and results.md.

Siblings: harness.py (timing, floors, records), the family modules (layout.py, pooling.py),
report.py (JSON -> markdown). Exit status 1 when any provider failed or disagreed with torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import time
from pathlib import Path

import torch

from bench import harness, report

FAMILIES = ("layout", "pooling", "norm", "conv")  # each names a module bench/<family>.py
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu"
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--ops", nargs="+", help="only these ops (default: all of the families)")
    parser.add_argument(
        "--dtypes", nargs="+", choices=sorted(DTYPES), help="default: the family's list"
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    parser.add_argument(
        "--budget", type=float, help="seconds of timing per case, all providers together"
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch and pykern (torch.set_num_threads)"
    )
    parser.add_argument(
        "--out", help="output folder (default: bench/results/<YYYY-MM-DD>-<device>/)"
    )
    return parser.parse_args(argv)


def _ms(record: harness.Record) -> str:
    ratio = "" if record.provider == "torch" else f" ({record.ratio_vs_torch or 0:.2f}x)"
    return f"{record.provider} {record.time_ms:.3f} ms{ratio}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.run: --device cuda, but torch sees no CUDA GPU")
    dtypes = None if args.dtypes is None else list(dict.fromkeys(DTYPES[d] for d in args.dtypes))

    if args.threads:
        torch.set_num_threads(args.threads)  # pykern's OpenMP loops share torch's libgomp
    meta = harness.machine_info(device)
    run_name = f"{datetime.date.today().isoformat()}-{meta['device_slug']}"
    out = Path(args.out) if args.out else harness.REPO_ROOT / "bench" / "results" / run_name
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench: {meta['device_name']}, torch {meta['torch']}, commit {meta['commit'][:12]}")
    load = (meta.get("load_average") or [0.0])[0]
    if device == "cpu" and load > 0.5:
        print(f"warning: load average {load:.2f}: other work shares the CPU; timings are noisy")

    floor_dtypes = dtypes or [torch.float32, torch.bfloat16, torch.float16]
    floors = harness.measure_floors(device, floor_dtypes, args.quick)
    matmul = ", ".join(f"{k} {v['tflops']:.2f}" for k, v in floors["matmul"].items())
    print(f"floors: copy {floors['copy']['gbps']:.1f} GB/s; matmul TFLOP/s: {matmul}", flush=True)

    s = harness.settings(device, args.quick)
    if args.budget is not None:
        s = dataclasses.replace(s, budget_s=args.budget)
    records, errors, skipped = [], [], {}
    started = time.perf_counter()
    for family in args.families:
        module = importlib.import_module(f"bench.{family}")
        todo = module.cases(device, args.quick, dtypes)
        todo = [case for case in todo if not args.ops or case.op in args.ops]
        for i, case in enumerate(todo, 1):
            ready, why = module.providers(case, device)
            for name, reason in why.items():
                skipped[(family, name)] = reason
            check = harness.family_check(module, case)
            try:
                rows, errs = harness.run_case(
                    case, module.make_input, ready, device, floors, s, meta, check
                )
            except Exception as err:  # e.g. out of memory: note it and go on to the next case
                rows, errs = [], [harness.error_entry(case, "case", err)]
            records += rows
            errors += errs
            line = " | ".join(_ms(r) for r in rows)
            line += "".join(f" | {e['provider']} ERROR {e['error']}" for e in errs)
            print(f"[{i:3d}/{len(todo)}] {case.label}: {line}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()  # the next case's buffers may be several times larger

    skipped_list = [{"family": f, "provider": p, "reason": r} for (f, p), r in skipped.items()]
    json_path = out / "results.json"
    harness.write_json(json_path, meta, floors, records, errors, skipped_list)
    (out / "results.md").write_text(report.render(json.loads(json_path.read_text())))
    print(
        f"{len(records)} records, {len(errors)} errors in {time.perf_counter() - started:.0f} s; "
        f"wrote {json_path} and results.md"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
