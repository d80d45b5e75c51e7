"""The benchmark cases through pytest-benchmark, for its comparison and histogram tools.

    pytest bench/ --benchmark-only --benchmark-group-by=group

One test per (device, op, shape, dtype, layout, provider); the group is op + shape + dtype, so
torch and pykern (and a pooling op's NCHW and NHWC inputs) sit in one table. Siblings: the family
modules (layout.py, pooling.py) give cases, providers and checks (their PYTEST_SHAPES are small,
so a plain `pytest bench/` without a GPU takes a minute or two); harness.py gives input
rotation. run.py is the full method (floors, interleaving, CUDA events): use it for published
numbers. A test fails only when a provider raises or disagrees with torch; there are no timing
assertions.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from bench import conv, harness, layout, norm, pooling

FAMILIES = (layout, pooling, norm, conv)
ROUND_BUDGET_S = 0.5  # timed seconds per test, about
PROVIDERS = {"cpu": ("torch", "pykern-cpu"), "cuda": ("torch", "pykern-cuda", "pykern-triton")}


def _params() -> list:
    params = []
    for device, names in PROVIDERS.items():
        for family in FAMILIES:
            for case in family.cases(device, shapes=family.PYTEST_SHAPES[device]):
                for name in names:
                    shape = "x".join(map(str, case.shape))
                    layout_id = case.layout.replace("->", "2")
                    ident = f"{device}-{case.op}-{shape}-{case.dtype_name}-{layout_id}-{name}"
                    params.append(pytest.param(family, device, case, name, id=ident))
    return params


@pytest.mark.parametrize(("family", "device", "case", "provider_name"), _params())
def test_bench(benchmark, family, device, case, provider_name):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    ready, skipped = family.providers(case, device)
    if provider_name in skipped:
        pytest.skip(skipped[provider_name])
    provider = next(p for p in ready if p.name == provider_name)

    first = family.make_input(case, device)
    inputs = harness.rotated_inputs(
        first, harness.rotation_count(first.numel() * first.element_size(), device)
    )
    with provider.active():
        check = harness.family_check(family, case)
        problem = check(first, provider.fn(first), ready[0].fn(first))
    assert problem is None, f"{provider_name}: {problem}"

    fn, count = provider.fn, [0]

    def call() -> None:
        # Next input in the rotation, so the previous call's data is out of cache; a CUDA
        # launch is asynchronous, so wait for it to finish inside the timed region.
        fn(inputs[count[0] % len(inputs)])
        count[0] += 1
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{case.op} {'x'.join(map(str, case.shape))} {case.dtype_name}"
    benchmark.extra_info.update(
        provider=provider_name, layout=case.layout, device=device, bytes=case.bytes
    )
    with provider.active():
        for _ in range(max(3, min(len(inputs), 32))):  # warm-up: compile or autotune, allocator
            call()
        # Rounds from our own estimate, not pytest-benchmark's calibration: one fast outlier in
        # its calibration (a busy CPU) could ask for thousands of rounds.
        start = time.perf_counter()
        for _ in range(3):
            call()
        per_call_s = (time.perf_counter() - start) / 3
        rounds = max(5, min(1000, math.ceil(ROUND_BUDGET_S / max(per_call_s, 1e-7))))
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["gbps"] = round(case.bytes / stats.median / 1e9, 2)
