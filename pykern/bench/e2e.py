"""End to end: ResNet-50 forward (eval, no grad) and forward+backward (train mode, parameter
gradients of one random output gradient), NCHW against channels_last, stock torch modules
against the same model converted to pykern's (pykern.convert), in images per second; forward
also with the converted model fused for inference (pykern.fuse: BatchNorm folded into the
convolutions, providers "pykern-<backend>+fuse").

GPU: batch 32 at 224 px; CPU: batch 2 at 224 px (112 px with --quick). The model is
pykern.models.resnet50(), stock torch layers with a fixed seed; pykern.convert(model) returns
(model, summary) and swaps in pykern's modules (the summary is kept in the report). Both come
from other parts of pykern and are imported when the section runs: where either is missing the
section is reported as skipped, with the reason.

Timed by harness.run_case like any family (providers interleaved, inputs rotated); a converted
model whose output differs from the stock one by more than 10% (relative norm) or is not finite
is an error, unless (float16/bfloat16) it is within twice the stock model's own error against
the model in float64 (a train-mode bfloat16 forward at batch 2 is some 17% off for both); the
difference is kept in each record (extra.rel_diff_vs_torch).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch

from pykern.bench.harness import (
    FWDBWD,
    Case,
    Check,
    Provider,
    error_bound,
    pykern_backends,
    random_image,
    relative_error,
)

FAMILY = "e2e"
OP = "resnet50"
LAYOUTS = ("nchw", "nhwc")
IMAGE = {"cuda": (32, 224), "cpu": (2, 224)}  # (batch, pixels)
QUICK_IMAGE = {"cuda": (32, 224), "cpu": (2, 112)}
DTYPES = {"cuda": [torch.bfloat16], "cpu": [torch.float32]}
MAX_REL_DIFF = 0.1

make_input = random_image


def _default_model() -> torch.nn.Module:
    from pykern import models  # another part of pykern: may not exist yet

    return models.resnet50()


def _default_convert(model: torch.nn.Module):
    import pykern

    convert = getattr(pykern, "convert", None)
    if convert is None or not callable(convert):  # the module pykern.convert, not re-exported
        from pykern.convert import convert
    return convert(model)


# Replaceable (tests use a small model): () -> stock model, and model -> (model, summary).
build_model: Callable[[], torch.nn.Module] = _default_model
convert_model: Callable[[torch.nn.Module], tuple] = _default_convert


def available() -> str | None:
    """None when the section can run, else why not (pykern.models or pykern.convert missing)."""
    if build_model is _default_model:
        try:
            from pykern import models
        except Exception as err:
            return f"pykern.models is not importable ({type(err).__name__}: {err})"
        if not hasattr(models, "resnet50"):
            return "pykern.models has no resnet50"
    if convert_model is _default_convert:
        import pykern

        convert = getattr(pykern, "convert", None)
        if convert is None or not callable(convert):
            try:
                from pykern.convert import convert  # noqa: F401
            except Exception as err:
                return f"pykern.convert is not importable ({type(err).__name__}: {err})"
    return None


def image(device: str, quick: bool) -> tuple[int, int]:
    return (QUICK_IMAGE if quick else IMAGE)[device]


def cases(
    device: str,
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> list[Case]:
    """(pass, dtype, layout) at the device's batch and image size; shapes are (N, 3, H, W)."""
    if shapes is None:
        batch, px = image(device, quick)
        shapes = [(batch, 3, px, px)]
    wanted = DTYPES[device] if dtypes is None else list(dtypes)
    return [
        Case(FAMILY, OP + suffix, tuple(shape), dtype, layout, 0, 0)
        for shape in shapes
        for dtype in wanted
        for suffix in ("", FWDBWD)
        for layout in LAYOUTS
    ]


_FLOPS: dict = {}


def with_flops(case: Case, device: str) -> Case:
    """The case with its FLOPs counted by torch's FlopCounterMode on one image of the stock
    model (float32, on device), times the batch; and the bytes of its parameters and the
    input (read once: a loose floor for a network, which re-reads activations)."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (case.shape[1:], case.pass_, device)
    if key not in _FLOPS:
        torch.manual_seed(0)
        model = build_model().to(device)
        x = torch.randn(1, *case.shape[1:], device=device)
        counter = FlopCounterMode(display=False)
        with counter:
            if case.pass_ == "fwd":
                model.eval()
                with torch.no_grad():
                    model(x)
            else:
                model.train()
                x2 = torch.randn(2, *case.shape[1:], device=device)  # train-mode BN: batch >= 2
                out = model(x2)
                torch.autograd.grad(out, [p for p in model.parameters()], torch.ones_like(out))
        count = counter.get_total_flops() // (1 if case.pass_ == "fwd" else 2)
        params = sum(p.numel() for p in model.parameters())
        _FLOPS[key] = (count, params)
        del model
    per_image, params = _FLOPS[key]
    size = torch.empty((), dtype=case.dtype).element_size()
    nbytes = (params + case.shape[0] * case.shape[1] * case.shape[2] * case.shape[3]) * size
    return dataclasses.replace(case, flops=per_image * case.shape[0], bytes=nbytes)


_MODELS: dict = {}
SUMMARIES: dict = {}  # (dtype, layout, pass) -> convert's summary, for the report


def _models(case: Case, device: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(stock, converted, fused or None) for the case's dtype, layout and pass; one set alive at
    a time. The fused model (inference only) is the converted one through pykern.fuse."""
    key = (case.dtype, case.layout, case.pass_, device)
    if key not in _MODELS:
        _MODELS.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
        stock = build_model().to(device=device, dtype=case.dtype, memory_format=fmt)
        stock.train(case.pass_ == "fwdbwd")
        converted, summary = convert_model(copy.deepcopy(stock))
        converted.train(case.pass_ == "fwdbwd")
        SUMMARIES[(case.dtype_name, case.layout, case.pass_)] = _jsonable(summary)
        fused = None
        if case.pass_ != "fwdbwd":
            from pykern.fuse import fuse

            fused = fuse(converted.eval())
        _MODELS[key] = (stock, converted, fused)
    return _MODELS[key]


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # ConvertSummary
        return {"text": str(value), **_jsonable(dataclasses.asdict(value))}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


_DY: dict = {}


def _dy(out: torch.Tensor) -> torch.Tensor:
    key = (tuple(out.shape), out.dtype, out.device)
    if key not in _DY:
        _DY.clear()
        g = torch.Generator(device="cpu").manual_seed(2)
        _DY[key] = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return _DY[key]


def _step(model: torch.nn.Module, fwdbwd: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def fwd_bwd(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        torch.autograd.grad(out, params, _dy(out))  # what loss.backward() computes
        return out.detach()

    return fwd_bwd if fwdbwd else fwd


def providers(case: Case, device: str) -> tuple[list[Provider], dict[str, str]]:
    """torch (the stock model), then the converted model under each pykern backend, and for
    inference the converted and fused model too."""
    stock, converted, fused = _models(case, device)
    fwdbwd = case.pass_ == "fwdbwd"
    ready = [Provider("torch", _step(stock, fwdbwd))]
    backends, skipped = pykern_backends(device)
    for backend in backends:
        ready.append(
            Provider(
                f"pykern-{backend}",
                _step(converted, fwdbwd),
                "auto" if backend == "cpu" else backend,
            )
        )
        if fused is not None:
            name, which = f"pykern-{backend}+fuse", "auto" if backend == "cpu" else backend
            ready.append(Provider(name, _step(fused, False), which))
    return ready, skipped


def _float64_output(case: Case, x: torch.Tensor) -> torch.Tensor:
    """The stock model's output on x computed in float64 (its weights upcast), once per input."""
    key = (case, x.data_ptr())
    if key not in _EXACT:
        _EXACT.clear()
        stock = _models(case, x.device.type)[0]
        model = copy.deepcopy(stock).double()  # its own running stats: train mode updates them
        with torch.no_grad():
            _EXACT[key] = model(x.double())
        del model
    return _EXACT[key]


_EXACT: dict = {}


def check_for(case: Case) -> Check:
    def check(x: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> str | None:
        if out.shape != ref.shape:
            return f"output shape {tuple(out.shape)} differs from torch's {tuple(ref.shape)}"
        if not torch.isfinite(out).all():
            return "output is not finite"
        diff = relative_error(out, ref)
        if diff <= MAX_REL_DIFF:
            return None
        message = f"output differs from the stock model's by {diff:.3g} (relative norm)"
        if out.dtype.itemsize >= 4:
            return message
        exact = _float64_output(case, x)
        ours, bound = relative_error(out, exact), error_bound(ref, exact)
        if ours <= bound:
            return None
        return f"{message}; {ours:.3g} from the float64 model's, over 2x the stock's ({bound:.3g})"

    return check


def extra_for(case: Case) -> Callable:
    def extra(provider: Provider, x: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> dict:
        return {"rel_diff_vs_torch": relative_error(out, ref), "batch": case.shape[0]}

    return extra


def release() -> None:
    """Frees the models (the next section's buffers may need the memory)."""
    _MODELS.clear()
    _DY.clear()
    _EXACT.clear()
