"""`python -m pykern.bench`: the benchmark report, and the commands around it.

    python -m pykern.bench [--device cpu|cuda] [--ops OPS] [--dtype DTYPES] [--layouts nchw,nhwc]
                           [--backends cuda,triton,torch] [--pass fwd|fwdbwd] [--quick] [--out DIR]
    python -m pykern.bench compare OLD.json NEW.json [--out FILE]
    python -m pykern.bench charts DIR      (PNG charts from DIR/report.json; rewrites report.md)
    python -m pykern.bench report DIR      (report.md again from DIR/report.json)
    python -m pykern.bench --list          (families and op names)

Bad input (an unknown name, --device cuda without a GPU, an output folder that cannot be
written) ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

PROG = "python -m pykern.bench"
COMMANDS = ("run", "compare", "charts", "report")


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; one line instead
        raise UsageError(message)


def _words(values: list[str] | None) -> list[str] | None:
    """'a,b' 'c' -> ['a', 'b', 'c'] (lists may be given with commas, spaces or both)."""
    if values is None:
        return None
    return [w.strip() for v in values for w in v.split(",") if w.strip()]


def _run_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="pykern against torch: the benchmark report (report.md, report.json, charts).",
        epilog=f"other commands: {PROG} compare OLD.json NEW.json | charts DIR | report DIR",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument(
        "--ops",
        nargs="+",
        help="families (layout, pooling, norm, conv, attention, e2e) or op names",
    )
    p.add_argument("--dtype", "--dtypes", dest="dtype", nargs="+", help="e.g. float32,bfloat16")
    p.add_argument("--layouts", nargs="+", help="nchw, nhwc (default both)")
    p.add_argument("--backends", nargs="+", help="torch, cpu, cuda, triton (default: all here)")
    p.add_argument("--pass", dest="passes", nargs="+", help="fwd, fwdbwd (default both)")
    p.add_argument("--quick", action="store_true", help="small sizes, short timing")
    p.add_argument("--out", help="output folder (default: bench/results/<date>-<device>)")
    p.add_argument("--shapes", nargs="+", help="shapes for every chosen family, e.g. 8x64x56x56")
    p.add_argument("--budget", type=float, help="seconds of timing per case (all providers)")
    p.add_argument("--minutes", type=float, help="time target of the whole run")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-charts", action="store_true", help="do not draw PNG charts")
    p.add_argument(
        "--no-prewarm",
        action="store_true",
        help="GPU: do not compile the cases' kernels in worker processes before timing",
    )
    p.add_argument("--list", action="store_true", help="list the families and op names")
    return p


def _check_names(kind: str, given: list[str], valid) -> None:
    unknown = [w for w in given if w not in valid]
    if unknown:
        raise UsageError(f"unknown {kind} {unknown[0]!r} (choose from: {', '.join(valid)})")


def _default_out(device: str) -> Path:
    from pykern.bench import harness

    name = f"{datetime.date.today().isoformat()}-{harness.device_slug(device)}"
    root = Path("bench/results")
    return (root if root.is_dir() else Path("pykern-bench")) / name


def _writable_folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".pykern-bench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to --out {str(path)!r}: {err.strerror or err}") from None
    return path


def options(argv: list[str]):
    """The parsed and checked options of a run (UsageError on bad input)."""
    import torch

    from pykern.bench import run

    args = _run_parser().parse_args(argv)
    if args.list:
        return args
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_names("device", [device], ("cpu", "cuda"))
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU on this machine")

    families, ops = list(run.FAMILIES), None
    if args.ops is not None:
        words = _words(args.ops)
        names = {f: run.op_names(f) for f in run.FAMILIES}
        valid = list(run.FAMILIES) + [n for f in run.FAMILIES for n in names[f]]
        _check_names("op or family", words, valid)
        families = [f for f in run.FAMILIES if f in words or any(w in names[f] for w in words)]
        ops = words

    dtypes = None
    if args.dtype is not None:
        words = _words(args.dtype)
        _check_names("dtype", words, list(run.DTYPES))
        dtypes = list(dict.fromkeys(run.DTYPES[w] for w in words))

    layouts = _words(args.layouts) or list(run.LAYOUTS)
    _check_names("layout", layouts, run.LAYOUTS)

    backends = _words(args.backends) or [b for b in run.BACKENDS if _runs_on(b, device)]
    _check_names("backend", backends, run.BACKENDS)
    for b in backends:
        if not _runs_on(b, device):
            where = "--device cpu" if b == "cpu" else "--device cuda"
            raise UsageError(f"backend {b!r} runs only with {where} (this run: --device {device})")

    passes = _words(args.passes) or list(run.PASSES)
    _check_names("pass", passes, run.PASSES)

    shapes = None
    if args.shapes is not None:
        shapes = []
        for word in _words(args.shapes):
            try:
                shape = tuple(int(n) for n in word.lower().split("x"))
            except ValueError:
                raise UsageError(f"bad shape {word!r} (write it like 8x64x56x56)") from None
            if not shape or min(shape) < 1:
                raise UsageError(f"bad shape {word!r} (sizes must be positive)")
            shapes.append(shape)
    for name in ("budget", "minutes", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be positive, got {value}")

    out = _writable_folder(Path(args.out) if args.out else _default_out(device))
    return run.Options(
        device=device,
        families=families,
        ops=ops,
        dtypes=dtypes,
        layouts=layouts,
        backends=backends,
        passes=passes,
        quick=args.quick,
        out=out,
        shapes=shapes,
        budget_s=args.budget,
        target_s=None if args.minutes is None else 60 * args.minutes,
        threads=args.threads,
        charts=not args.no_charts,
        prewarm=not args.no_prewarm,
        argv=[PROG, *argv],
    )


def _runs_on(backend: str, device: str) -> bool:
    return backend == "torch" or (backend == "cpu") == (device == "cpu")


def _print_list() -> None:
    from pykern.bench import run

    for family in run.FAMILIES:
        print(f"{family}: {', '.join(run.op_names(family))}")


def _report_json(where: str) -> Path:
    path = Path(where)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise UsageError(f"no report.json at {where!r}")
    return path


def _load(path: Path) -> dict:
    from pykern.bench import harness

    try:
        return harness.load_json(path)
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"cannot read {str(path)!r}: {err}") from None


def _compare(argv: list[str]) -> int:
    from pykern.bench import compare

    p = _Parser(prog=f"{PROG} compare", description="Two reports side by side.")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--out", help="write the markdown here instead of stdout")
    args = p.parse_args(argv)
    old, new = _load(_report_json(args.old)), _load(_report_json(args.new))
    text = compare.render(old, new, args.old, args.new)
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as err:
            raise UsageError(f"cannot write {args.out!r}: {err.strerror or err}") from None
    else:
        sys.stdout.write(text)
    return 0


def _charts(argv: list[str]) -> int:
    from pykern.bench import charts, report

    p = _Parser(prog=f"{PROG} charts", description="PNG charts from a report.json.")
    p.add_argument("dir", help="a folder with report.json (or the file itself)")
    p.add_argument("--out", help="folder for the PNGs and report.md (default: the report's)")
    args = p.parse_args(argv)
    path = _report_json(args.dir)
    out = _writable_folder(Path(args.out) if args.out else path.parent)
    doc = _load(path)
    files, note = charts.render_all(doc, out)
    if not files:
        raise UsageError(f"no charts drawn: {note}")
    (out / "report.md").write_text(report.render(doc, charts=files, charts_note=note))
    print(f"wrote {len(files)} charts and report.md to {out}")
    return 0


def _report(argv: list[str]) -> int:
    from pykern.bench import report

    p = _Parser(prog=f"{PROG} report", description="report.md again from a report.json.")
    p.add_argument("dir", help="a folder with report.json (or the file itself)")
    p.add_argument("--out", help="write the markdown here (default: report.md beside the json)")
    args = p.parse_args(argv)
    path = _report_json(args.dir)
    doc = _load(path)
    files = sorted(f.name for f in path.parent.glob("*.png"))
    note = None if files else f"no charts beside this report: {PROG} charts {path.parent}"
    target = Path(args.out) if args.out else path.parent / "report.md"
    try:
        target.write_text(report.render(doc, charts=files, charts_note=note))
    except OSError as err:
        raise UsageError(f"cannot write {str(target)!r}: {err.strerror or err}") from None
    print(f"wrote {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = argv[0] if argv and argv[0] in COMMANDS else "run"
        rest = argv[1:] if argv and argv[0] in COMMANDS else argv
        if command == "compare":
            return _compare(rest)
        if command == "charts":
            return _charts(rest)
        if command == "report":
            return _report(rest)
        opts = options(rest)
        if getattr(opts, "list", False):
            _print_list()
            return 0
        from pykern.bench import run

        return run.run(opts)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
