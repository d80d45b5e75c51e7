"""Compile a run's kernels in worker processes before the timing starts (GPU runs).

On the H100 run of 2026-11-26 the per-case timing budget had shrunk to nothing. Nearly all of a
case's wall time went to Triton compiling and autotuning its kernels for the case's shapes:
1.4-13 s an attention case, 23-73 s a ResNet-50 case, one case after another on one CPU core.
The full report could not fit in one device call. Here worker processes call each case's
providers once, in parallel. Triton keeps what they compile in its on-disk cache, where the
timing process then finds it. The timing process still autotunes for itself: an autotuner's
choice is per process, and one made while the workers share the GPU would be skewed.

Siblings: run.py (calls prewarm before its case loop), harness.py (Case, Provider).
"""

from __future__ import annotations

import multiprocessing
import os
import time

import torch

_PLAN: list | None = None  # a worker's copy of run.plan(opts): the cases, by index


def _warm(job: tuple) -> str | None:
    """In a worker: each provider of case `index` called once (forward, or forward and
    backward). Returns None, or the first error as text: the timing process meets the error
    again and reports it; prewarm only counts it."""
    opts, index = job
    global _PLAN
    from pykern.bench import run  # a spawned worker starts bare

    if _PLAN is None:
        _PLAN = run.plan(opts)[0]
    module, case = _PLAN[index]
    try:
        ready, _ = run.case_providers(module, case, opts)
        x = module.make_input(case, opts.device)
        for provider in ready:
            with provider.active():
                provider.fn(x)
        return None
    except Exception as err:  # out of memory beside the other workers, say
        return f"{case.family} {case.label}: {type(err).__name__}: {err}"
    finally:
        if hasattr(module, "release"):
            module.release()  # ResNet-50 models: one worker may meet several cases
        if opts.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def _workers_for(cases: int) -> int:
    """Half the CPU threads, at most 8 (each worker holds a CUDA context and a case's buffers)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2, cases))


def prewarm(opts, count: int, deadline: float) -> dict:
    """Runs cases 0..count-1 of run.plan(opts) once each in worker processes, in order, until
    all are done or time.perf_counter() passes deadline (the workers are then stopped).
    Returns what the report keeps: workers, cases run, errors met, seconds."""
    start = time.perf_counter()
    workers = _workers_for(count)
    warmed, errors = 0, []
    # spawn: the parent has a CUDA context, which a forked child must not inherit
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        results = pool.imap_unordered(_warm, [(opts, i) for i in range(count)], chunksize=1)
        while warmed < count:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                error = results.next(timeout=left)
            except multiprocessing.TimeoutError:
                break
            except Exception as err:  # raised past _warm's own catch (a failed synchronize)
                error = f"worker: {type(err).__name__}: {err}"
            warmed += 1
            if error is not None:
                errors.append(error)
    finally:
        pool.terminate()
        pool.join()
    return {"workers": workers, "cases": warmed, "of": count, "errors": errors,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
