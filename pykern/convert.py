"""pykern.convert: run an existing model on pykern's kernels, unchanged in behaviour.

Every module whose type is exactly one of the torch.nn types in SUPPORTED becomes the pykern
module that subclasses that type (pykern/nn/), by changing its class in place: pykern's modules
override forward only, so the module keeps its parameters and buffers (the same tensors),
state_dict keys, train/eval mode, device, dtype, memory format and registered hooks, and a
state_dict saved from either loads into the other. Sibling: pykern/fuse.py (inference folding).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

import pykern.nn as pnn

__all__ = ["SUPPORTED", "ConvertSummary", "convert"]

# torch.nn type -> name of its pykern.nn subclass. Looked up when convert runs, so a module this
# build of pykern lacks is reported, not an import error.
SUPPORTED: dict[type, str] = {
    nn.Conv2d: "Conv2d",
    nn.ConvTranspose2d: "ConvTranspose2d",
    nn.BatchNorm2d: "BatchNorm2d",
    nn.SyncBatchNorm: "SyncBatchNorm",
    nn.LayerNorm: "LayerNorm",
    nn.RMSNorm: "RMSNorm",
    nn.MaxPool2d: "MaxPool2d",
    nn.AvgPool2d: "AvgPool2d",
    nn.AdaptiveAvgPool2d: "AdaptiveAvgPool2d",
    nn.AdaptiveMaxPool2d: "AdaptiveMaxPool2d",
    nn.MultiheadAttention: "MultiheadAttention",
}

# What pykern's kernels compute in (pykern.functional validates the same set).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICES = ("cpu", "cuda", "meta")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Left:
    """A module convert did not replace: its path in the model, type name, and why."""

    path: str
    type_name: str
    reason: str


@dataclass
class ConvertSummary:
    """What convert did. converted: count per torch type name; left: modules not replaced
    (unsupported types, subclasses, excluded modules, configurations pykern refuses); notes:
    other changes (a TransformerEncoderLayer's fast path turned off). str() is a table."""

    converted: Counter = field(default_factory=Counter)
    left: list[Left] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def num_converted(self) -> int:
        return sum(self.converted.values())

    def __str__(self) -> str:
        groups: dict[tuple[str, str], list[str]] = {}
        for item in self.left:
            groups.setdefault((item.type_name, item.reason), []).append(item.path or "(root)")
        lines = [
            f"pykern.convert: {self.num_converted} modules converted, {len(self.left)} left as "
            "they were"
        ]
        if self.converted:
            width = max(len("converted"), *(len(name) for name in self.converted))
            lines.append(f"  {'converted':<{width}}  count")
            for name, count in sorted(self.converted.items()):
                lines.append(f"  {name:<{width}}  {count:>5}")
        if groups:
            width = max(len("not converted"), *(len(type_name) for type_name, _ in groups))
            reason_width = max(len("reason"), *(len(reason) for _, reason in groups))
            lines.append(f"  {'not converted':<{width}}  count  {'reason':<{reason_width}}  where")
            for (type_name, reason), paths in sorted(groups.items()):
                where = ", ".join(paths[:3]) + (
                    f", ... (+{len(paths) - 3})" if len(paths) > 3 else ""
                )
                lines.append(
                    f"  {type_name:<{width}}  {len(paths):>5}  {reason:<{reason_width}}  {where}"
                )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _check_selectors(name: str, selectors) -> tuple:
    """include/exclude: None, or a class, a string, or a sequence of them."""
    if selectors is None:
        return ()
    if isinstance(selectors, (str, type)):
        selectors = (selectors,)
    try:
        selectors = tuple(selectors)
    except TypeError:
        raise TypeError(
            f"convert: {name} must be a class, a string or a sequence of them, got "
            f"{type(selectors).__name__}"
        ) from None
    for s in selectors:
        if not isinstance(s, (str, type)):
            raise TypeError(
                f"convert: {name} entries must be classes or strings, got {type(s).__name__}"
            )
    return selectors


def _class_matches(cls: type, selector) -> bool:
    if isinstance(selector, type):
        return cls is selector
    return selector in (cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}")


def _path_matches(path: str, selector) -> bool:
    """A path selector names that module and everything under it."""
    return isinstance(selector, str) and (path == selector or path.startswith(selector + "."))


def _torch_base(cls: type) -> type | None:
    """The supported torch.nn type that cls is or derives from (the most derived one)."""
    for base in cls.__mro__:
        if base in SUPPORTED:
            return base
    return None


def _pykern_class(torch_type: type) -> type | None:
    return getattr(pnn, SUPPORTED[torch_type], None)


def _is_pykern(module: nn.Module) -> bool:
    return type(module).__module__.startswith("pykern.")


def _refusal(module: nn.Module, torch_type: type) -> str | None:
    """Why pykern's module cannot run this module's configuration, or None."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            if t.dtype not in _DTYPES:
                return f"dtype {t.dtype} (pykern computes float16/bfloat16/float32/float64)"
        if t.device.type not in _DEVICES:
            return f"device {t.device.type} (pykern runs cpu and cuda)"
    reason = getattr(_pykern_class(torch_type), "unsupported_reason", None)
    return reason(module) if callable(reason) else None


def _disable_transformer_fast_paths(model: nn.Module, converted: set[int], summary) -> None:
    """nn.TransformerEncoderLayer (in eval mode without gradients, among other conditions) and
    nn.TransformerEncoder (with a padding mask) take a fused "fast path"
    (torch._transformer_encoder_layer_fwd, nested tensors) that reads the layer's weights and
    never calls its submodules' forward, so converted LayerNorms and attention would not run.
    Each layer with converted submodules gets the attribute that path checks cleared, as a layer
    with a custom activation has it; the slow path is torch's documented computation."""
    layers = encoders = 0
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            parts = (module.self_attn, module.norm1, module.norm2)
            if any(id(p) in converted for p in parts) and module.activation_relu_or_gelu:
                module.activation_relu_or_gelu = 0
                layers += 1
        elif isinstance(module, nn.TransformerEncoder):
            if any(id(m) in converted for m in module.modules()) and getattr(
                module, "use_nested_tensor", False
            ):
                module.use_nested_tensor = False
                encoders += 1
    if layers:
        summary.notes.append(
            f"torch's inference fast path turned off in {layers} TransformerEncoderLayer(s), "
            "so their converted submodules run"
        )
    if encoders:
        summary.notes.append(
            f"nested-tensor fast path turned off in {encoders} TransformerEncoder(s)"
        )


def convert(
    model: nn.Module, inplace: bool = False, include=None, exclude=None
) -> tuple[nn.Module, ConvertSummary]:
    """Replaces every module of an exact supported torch.nn type with pykern's module.

    Supported: Conv2d, ConvTranspose2d, BatchNorm2d, SyncBatchNorm, LayerNorm, RMSNorm,
    MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d, MultiheadAttention (SUPPORTED).
    A replaced module is the same object with pykern's class: same parameters, buffers,
    state_dict keys, train/eval mode, device, dtype, memory format and hooks.

    Args:
        model: the nn.Module to convert.
        inplace: convert model itself; by default a deep copy is converted and model is left
            untouched.
        include: classes (or class names) of subclasses of a supported type to convert too. A
            subclass is otherwise left alone, since its own forward (or other methods) would be
            lost; an included one becomes the pykern module of its torch base class.
        exclude: classes, class names or module paths ("layer1.0.conv2"; a path covers
            everything under it) to leave as they are.

    Returns:
        (converted model, ConvertSummary); print the summary for a table of what was converted
        and what was left and why.

    Raises:
        TypeError: model is not an nn.Module, or include/exclude are not classes or strings.
        ValueError: include names a class that is not a subclass of a supported type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    include = _check_selectors("include", include)
    exclude = _check_selectors("exclude", exclude)
    for s in include:
        if isinstance(s, type) and _torch_base(s) is None:
            raise ValueError(
                f"convert: include names {s.__name__}, which is not a subclass of a type "
                f"pykern converts ({', '.join(t.__name__ for t in SUPPORTED)})"
            )
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as e:
            raise RuntimeError(
                f"convert: could not deep-copy the model ({type(e).__name__}: {e}); convert it "
                "in place with inplace=True"
            ) from e
    summary = ConvertSummary()
    converted: set[int] = set()
    seen: set[int] = set()
    already = 0

    def visit(module: nn.Module, path: str) -> None:
        nonlocal already
        if id(module) in seen:  # a module registered twice is converted once
            return
        seen.add(id(module))
        if _is_pykern(module) and _torch_base(type(module)) is not None:
            already += 1
        cls = type(module)
        torch_type = _torch_base(cls)
        excluded = next(
            (s for s in exclude if _class_matches(cls, s) or _path_matches(path, s)), None
        )
        if torch_type is not None and not _is_pykern(module):
            included = any(_class_matches(cls, s) for s in include)
            name = SUPPORTED[torch_type]
            target = _pykern_class(torch_type)
            if excluded is not None:
                reason = (
                    f"excluded ({excluded if isinstance(excluded, str) else excluded.__name__})"
                )
            elif parametrize.is_parametrized(module):
                reason = "parametrized (torch.nn.utils.parametrize)"
            elif cls is not torch_type and not included:
                own = "forward" in vars(cls) or "_conv_forward" in vars(cls)
                reason = (
                    f"subclass of torch.nn.{torch_type.__name__}"
                    + (" with its own forward" if own else "")
                    + " (name it in include to convert)"
                )
            elif target is None:
                reason = f"pykern.nn.{name} is not available in this version of pykern"
            else:
                reason = _refusal(module, torch_type)
            if reason is None:
                module.__class__ = target
                converted.add(id(module))
                summary.converted[name] += 1
            else:
                summary.left.append(Left(path, cls.__name__, reason))
            return  # a supported module's children (attention's out_proj) are its own
        children = list(module.named_children())
        if not children and not _is_pykern(module) and not isinstance(module, _CONTAINERS):
            if isinstance(module, torch.jit.ScriptModule):
                reason = "TorchScript module"
            else:
                reason = "no pykern module for this type"
            summary.left.append(Left(path, cls.__name__, reason))
        for name, child in children:
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    if already:
        summary.notes.append(f"{already} module(s) were pykern's already")
    _disable_transformer_fast_paths(model, converted, summary)
    return model, summary
