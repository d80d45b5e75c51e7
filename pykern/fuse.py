"""pykern.fuse: graph-level fusion and constant folding of a model in eval mode, with torch.fx.

Three rewrites, in this order, on the traced graph:
  1. Conv2d/ConvTranspose2d -> BatchNorm2d, where the convolution's output feeds only the
     BatchNorm: the BatchNorm (its running statistics and affine parameters) is folded into the
     convolution's weight and bias, and disappears.
  2. BatchNorm2d -> add -> ReLU (a ResNet block's tail, where the BatchNorm stays):
     pykern.nn.BatchNormAddReLU2d, one pass.
  3. BatchNorm2d -> ReLU (where the BatchNorm stays): pykern.nn.BatchNormReLU2d.
Where the model does not trace (data-dependent control flow), each child module is fused on
its own, recursively. Sibling: pykern/convert.py (module replacement).
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import pykern.nn as pnn

__all__ = ["fuse"]

_CONVS = (nn.Conv2d, nn.ConvTranspose2d, pnn.Conv2d, pnn.ConvTranspose2d)
_BATCH_NORMS = (nn.BatchNorm2d, pnn.BatchNorm2d)  # exact types: fused variants are done
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with pykern's modules kept as leaves as torch.nn's are (their
    forwards validate real tensors)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("pykern.nn") or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    graph = _Tracer().trace(module)
    name = module.__class__.__name__
    return torch.fx.GraphModule(module, graph, name)


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node, types) -> nn.Module | None:
    """node's module when node calls a module of exactly one of types."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    return module if type(module) in types else None


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _residual_of_add(node: torch.fx.Node, bn_node: torch.fx.Node):
    """The other operand when node adds bn_node and another graph value (no alpha), else None."""
    plain_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target == "add"
    )
    if not plain_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if a is bn_node and isinstance(b, torch.fx.Node) and b is not bn_node:
        return b
    if b is bn_node and isinstance(a, torch.fx.Node) and a is not bn_node:
        return a
    return None


def _calls_per_module(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _has_running_stats(bn: nn.Module) -> bool:
    return bn.running_mean is not None and bn.running_var is not None


def fold_batch_norm(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of conv (Conv2d or ConvTranspose2d) computing bn(conv(x)) with bn in eval mode:
    with s = bn.weight / sqrt(running_var + eps), weight' = weight * s per output channel and
    bias' = (bias - running_mean) * s + bn.bias, computed in float64."""
    fused = copy.deepcopy(conv)
    w = conv.weight.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = torch.ones_like(mean) if bn.weight is None else bn.weight.detach().double()
    beta = torch.zeros_like(mean) if bn.bias is None else bn.bias.detach().double()
    scale = gamma * torch.rsqrt(var + bn.eps)
    if isinstance(conv, nn.ConvTranspose2d):  # (C_in, K / groups, R, S): K is dim 1 per group
        g = conv.groups
        w = (w.unflatten(0, (g, -1)) * scale.view(g, 1, -1, 1, 1)).flatten(0, 1)
    else:  # (K, C / groups, R, S)
        w = w * scale.view(-1, 1, 1, 1)
    b = torch.zeros_like(mean) if conv.bias is None else conv.bias.detach().double()
    b = (b - mean) * scale + beta
    channels_last = not conv.weight.is_contiguous() and conv.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fused.weight = nn.Parameter(
        w.to(conv.weight.dtype).contiguous(memory_format=fmt), conv.weight.requires_grad
    )
    fused.bias = nn.Parameter(b.to(conv.weight.dtype), conv.weight.requires_grad)
    return fused


def _fold_conv_bn(gm: torch.fx.GraphModule) -> None:
    calls = _calls_per_module(gm)
    for node in list(gm.graph.nodes):
        bn = _module(gm, node, _BATCH_NORMS)
        if bn is None or not _has_running_stats(bn) or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node):
            continue
        conv = _module(gm, src, _CONVS)
        if conv is None or len(src.users) != 1 or calls[src.target] != 1:
            continue
        if len(src.args) != 1 or src.kwargs:  # ConvTranspose2d called with output_size
            continue
        _set_submodule(gm, src.target, fold_batch_norm(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)


def _set_submodule(gm: torch.fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _fused_bn(bn: nn.Module, cls: type) -> nn.Module:
    fused = copy.copy(bn)  # shares parameters and buffers; the class changes only here
    fused.__class__ = cls
    return fused


def _fuse_bn_add_relu(gm: torch.fx.GraphModule) -> None:
    calls = _calls_per_module(gm)
    for node in list(gm.graph.nodes):
        bn = _module(gm, node, _BATCH_NORMS)
        if bn is None or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        if len(node.users) != 1:
            continue
        add = next(iter(node.users))
        residual = _residual_of_add(add, node)
        if residual is None or len(add.users) != 1:
            continue
        relu = next(iter(add.users))
        if not _is_relu(gm, relu):
            continue
        _set_submodule(gm, node.target, _fused_bn(bn, pnn.BatchNormAddReLU2d))
        with gm.graph.inserting_before(relu):
            fused = gm.graph.call_module(node.target, (node.args[0], residual))
        relu.replace_all_uses_with(fused)
        for dead in (relu, add, node):
            gm.graph.erase_node(dead)


def _fuse_bn_relu(gm: torch.fx.GraphModule) -> None:
    calls = _calls_per_module(gm)
    for node in list(gm.graph.nodes):
        bn = _module(gm, node, _BATCH_NORMS)
        if bn is None or calls[node.target] != 1 or len(node.users) != 1:
            continue
        relu = next(iter(node.users))
        if not _is_relu(gm, relu):
            continue
        _set_submodule(gm, node.target, _fused_bn(bn, pnn.BatchNormReLU2d))
        relu.replace_all_uses_with(node)
        gm.graph.erase_node(relu)


def _fuse_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    _fold_conv_bn(gm)
    _fuse_bn_add_relu(gm)
    _fuse_bn_relu(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fuse(module: nn.Module) -> nn.Module:
    try:
        gm = _trace(module)
    except Exception:  # not traceable: fuse each child on its own
        for name, child in module.named_children():
            if next(child.children(), None) is not None:
                setattr(module, name, _fuse(child))
        return module
    return _fuse_graph(gm)


def fuse(model: nn.Module) -> nn.Module:
    """Folds and fuses a model for inference (eval mode); returns a new module, model is left
    untouched.

    Each BatchNorm2d that follows a Conv2d or ConvTranspose2d (whose output feeds nothing else)
    is folded into the convolution's weight and bias; a BatchNorm2d that stays is fused with a
    following add + ReLU (pykern.nn.BatchNormAddReLU2d) or ReLU (pykern.nn.BatchNormReLU2d).
    The result is a torch.fx.GraphModule when the model traces with torch.fx.symbolic_trace;
    otherwise the model's class is kept and each child is fused on its own, recursively.
    Convolutions stay the type they were: pykern.convert the result to run them on pykern.

    Raises:
        TypeError: model is not an nn.Module.
        RuntimeError: model (or a submodule) is in training mode: folding uses the running
            statistics, which training would still change.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or "(root)" for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            "fuse: the model must be in eval mode (call model.eval() first): folding BatchNorm "
            "into a convolution uses its running statistics, which training would still "
            f"update; in training mode: {', '.join(training[:5])}"
            + (", ..." if len(training) > 5 else "")
        )
    return _fuse(copy.deepcopy(model))
