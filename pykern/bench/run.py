"""One benchmark run: the floors, then every chosen case (families, then attention's peak
memory, then the end-to-end ResNet-50), then report.json, report.md and the charts.

Siblings: cli.py (the command line, its checks), harness.py (timing, floors, records), the
family modules, report.py (JSON -> markdown), charts.py (JSON -> PNG). Cases run in the order
the family modules list them; each case's timing budget shrinks when the run is behind its
time target (never below the minimum number of repeats).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import time
import types
from pathlib import Path

import torch

from pykern.bench import harness, prewarm
from pykern.bench.progress import Progress, clock

FAMILIES = ("layout", "pooling", "norm", "conv", "attention", "e2e")
# The order a run takes them: the slow, most wanted sections first, so that a run that reaches
# its time limit (HARD_LIMIT x the target) drops shapes of the many small cases, not them.
RUN_ORDER = ("attention", "e2e", "conv", "norm", "pooling", "layout")
HARD_LIMIT = 1.25
LAYOUT_FAMILIES = ("layout", "pooling", "norm", "conv", "e2e")  # where --layouts applies
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
LAYOUTS = ("nchw", "nhwc")
BACKENDS = ("torch", "cpu", "cuda", "triton")
PASSES = ("fwd", "fwdbwd")
# Time targets (seconds) for a whole run, floors to report: the per-case budget shrinks to fit.
# cuda: one device call holds the CUDA build (about 100 s on an H100 machine) and the report,
# 1.25x its target at most, inside its 10 minutes.
TARGET_S = {("cpu", False): 420, ("cpu", True): 300, ("cuda", False): 330, ("cuda", True): 100}
PREWARM_SHARE = 0.45  # of the target, at most, for compiling in worker processes (GPU)


@dataclasses.dataclass
class Options:
    device: str
    families: list[str]
    ops: list[str] | None  # op names (already resolved to a family each), None: all
    dtypes: list[torch.dtype] | None  # None: each family's own list
    layouts: list[str]
    backends: list[str]
    passes: list[str]
    quick: bool
    out: Path
    shapes: list[tuple[int, ...]] | None = None
    budget_s: float | None = None  # per case
    target_s: float | None = None  # whole run
    threads: int | None = None
    charts: bool = True
    prewarm: bool = True  # GPU: compile the cases' kernels in worker processes first
    argv: list[str] = dataclasses.field(default_factory=list)


def family_module(name: str) -> types.ModuleType:
    return importlib.import_module(f"pykern.bench.{name}")


def op_names(family: str) -> list[str]:
    """The op names a family answers to on the command line (its cases' ops without the pass
    suffix), plus its aliases."""
    module = family_module(family)
    if family == "conv":
        names = list(module.LAYERS)
    elif family == "e2e":
        names = [module.OP]
    else:
        names = list(module.OPS)
    return names + list(getattr(module, "ALIASES", {}))


def _selected(case: harness.Case, module: types.ModuleType, opts: Options) -> bool:
    if opts.ops is not None:
        aliases = getattr(module, "ALIASES", {})
        wanted = set(opts.ops)
        for word in opts.ops:
            wanted.update(aliases.get(word, ()))
        if case.family not in wanted and case.base_op not in wanted and case.op not in wanted:
            return False
    if case.pass_ not in opts.passes:
        return False
    if case.family in LAYOUT_FAMILIES and case.layout not in ("rows",):
        source = case.layout.split("->")[0]  # a conversion counts as its input's layout
        if source not in opts.layouts:
            return False
    return True


def _providers_wanted(providers: list, skipped: dict, opts: Options) -> tuple[list, dict]:
    """The reference provider always (it is the check and the ratio's denominator), the rest
    as --backends says."""
    keep = [providers[0]] + [
        p for p in providers[1:] if harness.provider_backend(p.name) in opts.backends
    ]
    why = {k: v for k, v in skipped.items() if harness.provider_backend(k) in opts.backends}
    return keep, why


def case_providers(module: types.ModuleType, case: harness.Case, opts: Options):
    """(ready, why) for one case as --backends asks: the providers to call, torch's first, and
    {provider: why it is skipped}."""
    ready, why = module.providers(case, opts.device)
    return _providers_wanted(ready, why, opts)


def plan(opts: Options) -> tuple[list[tuple[types.ModuleType, harness.Case]], dict]:
    """The cases to run, in order, and {family: why its section did not run}."""
    todo, sections = [], {}
    for family in sorted(opts.families, key=RUN_ORDER.index):
        module = family_module(family)
        why = module.available() if hasattr(module, "available") else None
        if why is not None:
            sections[family] = {"status": "skipped", "reason": why}
            continue
        chosen = [
            c
            for c in module.cases(opts.device, opts.quick, opts.dtypes, opts.shapes)
            if _selected(c, module, opts)
        ]
        if chosen:
            sections[family] = {"status": "ran", "cases": len(chosen)}
        todo += [(module, case) for case in chosen]
    return todo, sections


def _result_line(records: list[harness.Record], errors: list[dict]) -> str:
    parts = []
    for r in records:
        ratio = "" if r.provider == r.reference else f" ({r.ratio_vs_torch or 0:.2f}x)"
        parts.append(f"{r.provider} {r.time_ms:.4g} ms{ratio}")
    parts += [f"{e['provider']} ERROR {e['error'][:120]}" for e in errors]
    return " | ".join(parts)


def run(opts: Options) -> int:
    """The whole run; returns the exit status (1 when any provider raised or disagreed)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)  # pykern's OpenMP loops share torch's libgomp
    started = time.perf_counter()
    meta = harness.machine_info(opts.device)
    device = opts.device
    print(
        f"pykern.bench: {meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"commit {meta['commit'][:12]} -> {opts.out}",
        flush=True,
    )
    load = (meta.get("load_average") or [0.0])[0]
    if device == "cpu" and load > 0.5:
        print(
            f"warning: load average {load:.2f}: other work shares the CPU; timings are noisy"
            + ("; --threads 1 suffers less from it" if torch.get_num_threads() > 1 else "")
        )

    todo, sections = plan(opts)
    for family, section in sections.items():
        if section["status"] == "skipped":
            print(f"{family}: skipped ({section['reason']})", flush=True)
    do_memory = (
        device == "cuda"
        and sections.get("attention", {}).get("status") == "ran"
        and opts.shapes is None
    )
    dtypes_used = list(dict.fromkeys(c.dtype for _, c in todo)) or [torch.float32]
    floors = harness.measure_floors(device, dtypes_used, opts.quick)
    matmul = ", ".join(f"{k} {v['tflops']:.3g}" for k, v in floors["matmul"].items())
    print(f"floors: copy {floors['copy']['gbps']:.1f} GB/s; matmul TFLOP/s: {matmul}", flush=True)

    target_s = opts.target_s if opts.target_s is not None else TARGET_S[(device, opts.quick)]
    warmed = None
    if device == "cuda" and opts.prewarm and len(todo) > 1:
        print(f"compiling kernels: {len(todo)} cases, in worker processes", flush=True)
        warmed = prewarm.prewarm(opts, len(todo), started + PREWARM_SHARE * target_s)
        print(
            f"compiled: {warmed['cases']} of {len(todo)} cases in {warmed['workers']} workers, "
            f"{warmed['seconds']} s ({len(warmed['errors'])} raised there)",
            flush=True,
        )

    base = harness.settings(device, opts.quick)
    if opts.budget_s is not None:
        base = dataclasses.replace(base, budget_s=opts.budget_s)
    deadline = started + target_s
    hard_deadline = started + HARD_LIMIT * target_s
    not_run: list[dict] = []
    case_times: list[dict] = []  # each case's wall time (checks, warm-up, timing): for tuning
    memory: list[dict] = []
    records: list[harness.Record] = []
    errors: list[dict] = []
    skipped: dict[tuple[str, str], str] = {}
    progress = Progress(
        len(todo) + (1 if do_memory else 0), limit_s=hard_deadline - time.perf_counter()
    )

    def document(partial: bool = False) -> dict:
        """report.json's content so far (partial: written after each family, so a run that is
        killed leaves what it had measured)."""
        return {
            "schema": 2,
            "tool": "python -m pykern.bench",
            "argv": opts.argv,
            "partial": partial,
            "machine": meta,
            "floors": floors,
            "settings": {
                "device": device,
                "quick": opts.quick,
                "families": opts.families,
                "ops": opts.ops,
                "dtypes": None
                if opts.dtypes is None
                else [harness.dtype_name(d) for d in opts.dtypes],
                "layouts": opts.layouts,
                "backends": opts.backends,
                "passes": opts.passes,
                "timing": dataclasses.asdict(base),
                "target_s": target_s,
                "limit_s": HARD_LIMIT * target_s,
                "duration_s": round(time.perf_counter() - started, 1),
                "prewarm": warmed,
            },
            "sections": sections,
            "records": [r.to_dict() for r in records],
            "errors": errors,
            "skipped": [{"family": f, "provider": p, "reason": r} for (f, p), r in skipped.items()],
            "attention_memory": memory,
            "not_run": not_run,
            "case_times": case_times,
        }

    overheads: list[float] = []
    e2e_summaries: dict = {}
    for i, (module, case) in enumerate(todo):
        if time.perf_counter() > hard_deadline:
            not_run.append(harness.error_entry(case, "-", TimeoutError("the run's time limit")))
            progress.done()
            continue
        progress.start(f"{case.family} {case.label}")
        # Fair share of the time left, less what a case costs beyond its timing budget.
        left = len(todo) - i
        share = (deadline - time.perf_counter()) / left
        overhead = sorted(overheads)[len(overheads) // 2] if overheads else 0.0
        budget = min(base.budget_s, max(0.0, share - overhead))
        s = dataclasses.replace(base, budget_s=budget)
        case_start = time.perf_counter()
        try:
            if case.family == "e2e":
                case = module.with_flops(case, device)
            ready, why = case_providers(module, case, opts)
            for name, reason in why.items():
                skipped[(case.family, name)] = reason
            extra = module.extra_for(case) if hasattr(module, "extra_for") else None
            rows, errs = harness.run_case(
                case,
                module.make_input,
                ready,
                device,
                floors,
                s,
                meta,
                harness.family_check(module, case),
                extra,
            )
        except Exception as err:  # out of memory, a model that does not build: note, go on
            rows, errs = [], [harness.error_entry(case, "case", err)]
        wall = time.perf_counter() - case_start
        overheads.append(max(0.0, wall - budget))
        case_times.append(
            {
                "family": case.family,
                "case": case.label,
                "wall_s": round(wall, 3),
                "budget_s": budget,
            }
        )
        records += rows
        errors += errs
        progress.log(f"{case.family} {case.label}: {_result_line(rows, errs)}")
        progress.done()
        if device == "cuda":
            torch.cuda.empty_cache()  # the next case's buffers may be several times larger
        last_of_family = i + 1 == len(todo) or todo[i + 1][1].family != case.family
        if case.family == "e2e" and last_of_family:
            e2e_summaries = dict(module.SUMMARIES)
            module.release()
        if case.family == "attention" and last_of_family and do_memory:
            progress.start("attention peak memory")
            memory = module.measure_memory(
                device,
                dtype=(opts.dtypes or [torch.bfloat16])[0],
                backends=opts.backends,
                passes=opts.passes,
                progress=lambda text: progress.start(text),
            )
            progress.done()
        if last_of_family:
            write_outputs(document(partial=True), opts.out, charts=False, quiet=True)
    progress.close()
    if not_run:
        print(f"time limit: {len(not_run)} cases not run (listed in the report)", flush=True)
    if "e2e" in sections and sections["e2e"]["status"] == "ran":
        sections["e2e"]["convert_summary"] = {
            "/".join(k): v for k, v in e2e_summaries.items()
        }  # fmt: skip
    if "attention" in sections and sections["attention"]["status"] == "ran" and not do_memory:
        sections["attention"]["memory"] = (
            "peak memory is measured on a GPU only (torch.cuda.max_memory_allocated)"
            if device != "cuda"
            else "peak memory not measured: only with the default shapes"
        )

    doc = document()
    write_outputs(doc, opts.out, charts=opts.charts)
    duration = doc["settings"]["duration_s"]
    print(
        f"{len(records)} records, {len(errors)} errors in {clock(duration)} "
        f"(target {clock(target_s)}); wrote {opts.out}/report.json, report.md",
        flush=True,
    )
    return 1 if errors else 0


def write_outputs(doc: dict, out: Path, charts: bool = True, quiet: bool = False) -> None:
    """report.json, the charts (when matplotlib is importable), then report.md naming them."""
    from pykern.bench import charts as charts_module
    from pykern.bench import report

    (out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    if charts:
        files, note = charts_module.render_all(doc, out)
    elif doc.get("partial"):
        files, note = [], "not drawn yet: this report is partial (the run is going on, or was cut)"
    else:
        files, note = [], "charts not drawn (--no-charts)"
    if note and charts and not quiet:
        print(f"charts: {note}", file=sys.stderr)
    (out / "report.md").write_text(report.render(doc, charts=files, charts_note=note))
