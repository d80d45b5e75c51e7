"""The benchmark cases through pytest-benchmark, for its comparison and histogram tools.

    pytest bench/ --benchmark-only --benchmark-group-by=group

One test per (device, op, pass, shape, dtype, layout, provider); the group is op + shape + dtype
(the op name carries "_fwdbwd" for forward+backward), so NCHW and NHWC and every backend of one
case sit in one table. The cases, providers and checks are pykern.bench's family modules
(their PYTEST_SHAPES are small, so `pytest bench/` without a GPU takes a minute or two, and
`--benchmark-disable` runs each once). `python -m pykern.bench` is the full method (floors,
interleaving, CUDA events): use it for published numbers. A test fails only when a provider
raises or disagrees with torch; there are no timing assertions.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from pykern.bench import attention, conv, harness, layout, norm, pooling

FAMILIES = (layout, pooling, norm, conv, attention)
ROUND_BUDGET_S = 0.5  # timed seconds per test, about
DEVICES = ("cpu", "cuda")


def _params() -> list:
    params = []
    for device in DEVICES:
        for family in FAMILIES:
            why = family.available() if hasattr(family, "available") else None
            if why is not None:
                ident = f"{device}-{family.FAMILY}-unavailable"
                params.append(pytest.param(family, device, None, None, why, id=ident))
                continue
            for case in family.cases(device, shapes=family.PYTEST_SHAPES[device]):
                for name in _provider_names(family, case, device):
                    shape = "x".join(map(str, case.shape))
                    layout_id = case.layout.replace("->", "2")
                    ident = f"{device}-{case.op}-{shape}-{case.dtype_name}-{layout_id}-{name}"
                    params.append(pytest.param(family, device, case, name, None, id=ident))
    return params


def _provider_names(family, case, device) -> list[str]:
    """Provider names without touching a GPU (collection must work without one)."""
    if family is attention:
        torch_names = list(attention.TORCH_BACKENDS)
    else:
        torch_names = ["torch"]
    pykern_names = ["pykern-cpu"] if device == "cpu" else ["pykern-cuda", "pykern-triton"]
    return torch_names + pykern_names


@pytest.mark.parametrize(("family", "device", "case", "provider_name", "unavailable"), _params())
def test_bench(benchmark, family, device, case, provider_name, unavailable):
    if unavailable is not None:
        pytest.skip(unavailable)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    ready, skipped = family.providers(case, device)
    if provider_name in skipped:
        pytest.skip(skipped[provider_name])
    provider = next((p for p in ready if p.name == provider_name), None)
    if provider is None:
        pytest.skip(f"{provider_name} does not run this case here")

    first = family.make_input(case, device)
    if provider is not ready[0]:  # the reference is what the others are checked against
        with ready[0].active():
            ref = ready[0].fn(first)
        with provider.active():
            check = harness.family_check(family, case)
            problem = check(first, provider.fn(first), ref)
        assert problem is None, f"{provider_name}: {problem}"
        del ref

    benchmark.group = f"{case.op} {'x'.join(map(str, case.shape))} {case.dtype_name}"
    benchmark.extra_info.update(
        provider=provider_name, layout=case.layout, device=device, bytes=case.bytes
    )
    if case.flops:
        benchmark.extra_info["flops"] = case.flops
    if benchmark.disabled:  # --benchmark-disable: the check above was the point; one more call
        with provider.active():
            benchmark(provider.fn, first)
        return

    inputs = harness.rotated_inputs(
        first, harness.rotation_count(first.numel() * first.element_size(), device)
    )
    fn, count = provider.fn, [0]

    def call() -> None:
        # Next input in the rotation, so the previous call's data is out of cache; a CUDA
        # launch is asynchronous, so wait for it to finish inside the timed region.
        fn(inputs[count[0] % len(inputs)])
        count[0] += 1
        if device == "cuda":
            torch.cuda.synchronize()

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
        benchmark.extra_info["median_s"] = stats.median
        benchmark.extra_info["gbps"] = round(case.bytes / stats.median / 1e9, 2)
        if case.flops:
            benchmark.extra_info["tflops"] = round(case.flops / stats.median / 1e12, 4)
