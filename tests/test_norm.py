"""Normalization family: LayerNorm, RMSNorm, their residual-add forms, LayerNorm2d, BatchNorm
(train/eval, running stats, fused ReLU and add+ReLU) and SyncBatchNorm.

Sections as in every family: values (and strides) against a float64 reference (torch's op on
upcast input) by DESIGN.md's tolerance rule, gradients (against float64 autograd, and
gradcheck), opcheck, torch.compile, modules, bad input. Outputs are poisoned first (conftest).
"""

import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import pykern.functional as PF
import pykern.nn as PN
from tests.helpers import assert_close_to_ref, make_input

LOW = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _sid(shape):
    return "x".join(map(str, shape))


def _params(shape, dtype, device, affine=True, bias=True):
    if not affine:
        return None, None
    w = (1 + 0.5 * torch.randn(shape, device=device)).to(dtype)
    b = (0.5 * torch.randn(shape, device=device)).to(dtype) if bias else None
    return w, b


def _double(*ts):
    return [None if t is None else t.detach().to(torch.float64, copy=True) for t in ts]


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _check_grads(ours, ref_fn, inputs, lowp_fn=None, tol=1e-4):
    """Backpropagates one random gradient through ours(*inputs) and ref_fn(*float64 inputs)
    (and, for float16/bfloat16, through torch's op in that precision) and compares every input's
    gradient by DESIGN.md's rule. Outputs may be a tensor or a tuple of tensors."""
    leaves = [_leaf(t) for t in inputs]
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    out = ours(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    gs = [torch.randn_like(o) for o in out]
    torch.autograd.backward(out, gs)
    ref = ref_fn(*ref_leaves)
    ref = ref if isinstance(ref, tuple) else (ref,)
    torch.autograd.backward(ref, [g.double() for g in gs])
    low = None
    if lowp_fn is not None and out[0].dtype in LOW:
        low_leaves = [_leaf(t) for t in inputs]
        low_out = lowp_fn(*low_leaves)
        low_out = low_out if isinstance(low_out, tuple) else (low_out,)
        torch.autograd.backward(low_out, gs)
        low = [None if t is None else t.grad for t in low_leaves]
    for i, (mine, theirs) in enumerate(zip(leaves, ref_leaves, strict=True)):
        if mine is None:
            continue
        assert mine.grad is not None, f"input {i} got no gradient"
        assert mine.grad.dtype == mine.dtype
        assert_close_to_ref(mine.grad, theirs.grad, None if low is None else low[i], tol)


# LayerNorm and RMSNorm

# (input shape, normalized_shape): odd sizes, one normalized element, several normalized dims,
# a zero batch, rows long enough to need looping.
ROW_CASES = [
    ((5, 7), (7,)),
    ((2, 3, 33), (33,)),
    ((3, 4, 5), (4, 5)),
    ((6, 1), (1,)),
    ((0, 8), (8,)),
    ((3, 1000), (1000,)),
    ((2, 4097), (4097,)),
]
ROW_OPS = {
    "layer_norm": (
        lambda x, shape, w, b, eps: PF.layer_norm(x, shape, w, b, eps),
        lambda x, shape, w, b, eps: F.layer_norm(x, shape, w, b, eps),
    ),
    "rms_norm": (
        lambda x, shape, w, b, eps: PF.rms_norm(x, shape, w, eps),
        lambda x, shape, w, b, eps: F.rms_norm(x, shape, w, eps),
    ),
}


def _row_case(target, op, shape, nshape, dtype, affine=True, eps=1e-5):
    x = make_input(shape, dtype, target.device)
    w, b = _params(nshape, dtype, target.device, affine, bias=op == "layer_norm")
    ours, ref = ROW_OPS[op]
    out = ours(x, nshape, w, b, eps)
    expected = ref(x, nshape, w, b, eps)
    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    if out.numel():
        assert_close_to_ref(out, ref(*_double(x), nshape, *_double(w, b), eps), expected)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: _sid(c[0]) + "_" + _sid(c[1]))
@pytest.mark.parametrize("op", list(ROW_OPS))
def test_row_norm_matches_torch(target, op, case, affine):
    _row_case(target, op, *case, torch.float32, affine)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(ROW_OPS))
def test_row_norm_dtypes(target, op, dtype):
    _row_case(target, op, (4, 3, 257), (257,), dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_row_norm_float32_params_with_low_precision_input(target, dtype):
    x = make_input((3, 96), dtype, target.device)
    w, b = _params((96,), torch.float32, target.device)
    out = PF.layer_norm(x, (96,), w, b)
    assert out.dtype == dtype
    ref = F.layer_norm(x.double(), (96,), w.double(), b.double())
    assert_close_to_ref(out, ref, F.layer_norm(x, (96,), w.to(dtype), b.to(dtype)))


@pytest.mark.parametrize("n", [1, 3, 65536])
def test_row_norm_hidden_sizes(target, n):
    _row_case(target, "layer_norm", (2, n), (n,), torch.float32)
    _row_case(target, "rms_norm", (2, n), (n,), torch.float32)


def test_rms_norm_default_eps_is_finfo_eps(target):
    x = make_input((4, 16), torch.float32, target.device) * 1e-4
    torch.testing.assert_close(PF.rms_norm(x, (16,)), F.rms_norm(x, (16,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_large_mean(target, dtype):
    """A mean of 1e4 and a spread of 1: E[x^2] - E[x]^2 would lose every digit here."""
    x = (1e4 + torch.randn(8, 512, device=target.device)).to(dtype)
    out = PF.layer_norm(x, (512,))
    ref = F.layer_norm(x.double(), (512,))
    assert_close_to_ref(out, ref, F.layer_norm(x, (512,)), fp32_tol=1e-3)


def test_row_norm_noncontiguous_input(target):
    x = make_input((4, 6, 10), torch.float32, target.device, noncontig=True)
    out = PF.layer_norm(x, (6, 10))
    assert_close_to_ref(out, F.layer_norm(x.double(), (6, 10)))


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_norm_matches_torch(target, op, dtype):
    x = make_input((3, 5, 129), dtype, target.device)
    r = make_input((3, 5, 129), dtype, target.device)
    w, b = _params((129,), dtype, target.device)
    if op == "add_layer_norm":
        out, s = PF.add_layer_norm(x, r, (129,), w, b)
        ref_fn = lambda s_: F.layer_norm(s_, (129,), *_double(w, b))  # noqa: E731
        expected = F.layer_norm(x + r, (129,), w, b)
    else:
        out, s = PF.add_rms_norm(x, r, (129,), w)
        ref_fn = lambda s_: F.rms_norm(s_, (129,), w.double(), torch.finfo(dtype).eps)  # noqa: E731
        expected = F.rms_norm(x + r, (129,), w)
    assert torch.equal(s, x + r), "the sum is x + residual in x's dtype"
    assert_close_to_ref(out, ref_fn((x + r).double()), expected)


@pytest.mark.parametrize("op", list(ROW_OPS))
@pytest.mark.parametrize("case", [((5, 7), (7,)), ((2, 3, 4, 5), (4, 5))], ids=["7", "4x5"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_row_norm_grads(target, op, case, affine):
    shape, nshape = case
    x = make_input(shape, torch.float32, target.device)
    w, b = _params(nshape, torch.float32, target.device, affine, bias=op == "layer_norm")
    ours, ref = ROW_OPS[op]
    _check_grads(
        lambda x, w, b: ours(x, nshape, w, b, 1e-5),
        lambda x, w, b: ref(x, nshape, w, b, 1e-5),
        [x, w, b],
    )


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("op", list(ROW_OPS))
def test_row_norm_low_precision_grads(target, op, dtype):
    x = make_input((6, 200), dtype, target.device)
    w, b = _params((200,), dtype, target.device, bias=op == "layer_norm")
    ours, ref = ROW_OPS[op]
    _check_grads(
        lambda x, w, b: ours(x, (200,), w, b, 1e-5),
        lambda x, w, b: ref(x, (200,), w, b, 1e-5),
        [x, w, b],
        lowp_fn=lambda x, w, b: ref(x, (200,), w, b, 1e-5),
    )


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_add_norm_grads_through_both_outputs(target, op):
    x = make_input((4, 37), torch.float32, target.device)
    r = make_input((4, 37), torch.float32, target.device)
    w, b = _params((37,), torch.float32, target.device)

    def ours(x, r, w, b):
        if op == "add_layer_norm":
            return PF.add_layer_norm(x, r, (37,), w, b)
        return PF.add_rms_norm(x, r, (37,), w, 1e-6)

    def ref(x, r, w, b):
        s = x + r
        if op == "add_layer_norm":
            return F.layer_norm(s, (37,), w, b), s
        return F.rms_norm(s, (37,), w, 1e-6), s

    _check_grads(ours, ref, [x, r, w, None if op == "add_rms_norm" else b])


@pytest.mark.parametrize("op", list(ROW_OPS))
def test_row_norm_gradcheck(target, op):
    x = make_input((3, 2, 6), torch.float64, target.device, requires_grad=True)
    w, b = (_leaf(t) for t in _params((6,), torch.float64, target.device))
    ours, _ = ROW_OPS[op]
    if op == "rms_norm":
        fn = lambda x, w: ours(x, (6,), w, None, 1e-5)  # noqa: E731
        args = (x, w)
    else:
        fn = lambda x, w, b: ours(x, (6,), w, b, 1e-5)  # noqa: E731
        args = (x, w, b)
    assert torch.autograd.gradcheck(fn, args, fast_mode=target.backend == "triton")


def test_add_layer_norm_gradcheck(target):
    x, r = (make_input((3, 5), torch.float64, target.device, requires_grad=True) for _ in "xr")
    w, b = (_leaf(t) for t in _params((5,), torch.float64, target.device))
    assert torch.autograd.gradcheck(lambda *a: PF.add_layer_norm(a[0], a[1], 5, a[2], a[3]),
                                    (x, r, w, b), fast_mode=target.backend == "triton")  # fmt: skip


def test_row_norm_parameter_grads_are_deterministic(target):
    x = make_input((64, 48), torch.float32, target.device, requires_grad=True)
    w, b = (_leaf(t) for t in _params((48,), torch.float32, target.device))
    g = torch.randn(64, 48, device=target.device)
    grads = []
    for _ in range(2):
        w.grad = b.grad = x.grad = None
        PF.layer_norm(x, 48, w, b).backward(g)
        grads.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    for a, c in zip(*grads, strict=True):
        assert torch.equal(a, c)


# LayerNorm2d (over the channels of each pixel)


def _ln2d_ref(x, w, b, eps=1e-6):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 96, 4, 4), (2, 1, 3, 3), (3, 7, 1, 1)],
                         ids=_sid)  # fmt: skip
def test_layer_norm_2d(target, shape, dtype, layout):
    x = make_input(shape, dtype, target.device, layout=layout)
    w, b = _params((shape[1],), dtype, target.device)
    out = PF.layer_norm_2d(x, w, b)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and out.dtype == dtype
    assert_close_to_ref(out, _ln2d_ref(*_double(x, w, b)), _ln2d_ref(x, w, b))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_layer_norm_2d_grads(target, layout):
    x = make_input((2, 6, 3, 5), torch.float32, target.device, layout=layout)
    w, b = _params((6,), torch.float32, target.device)
    _check_grads(PF.layer_norm_2d, _ln2d_ref, [x, w, b])
    x64 = make_input((1, 3, 2, 3), torch.float64, target.device, layout=layout)
    w64, b64 = (_leaf(t) for t in _params((3,), torch.float64, target.device))
    assert torch.autograd.gradcheck(
        PF.layer_norm_2d, (x64.requires_grad_(), w64, b64), fast_mode=target.backend == "triton"
    )


# BatchNorm


def _bn_input(shape, dtype, device, layout):
    if layout == "nhwc" and len(shape) not in (4, 5):
        pytest.skip("channels_last needs a 4D or 5D input")
    return make_input(shape, dtype, device, layout=layout)


def _stats(C, dtype, device):
    return torch.randn(C, device=device).to(dtype), (0.5 + torch.rand(C, device=device)).to(dtype)


BN_SHAPES = [(4, 3, 5, 7), (2, 16, 1, 1), (8, 5), (2, 4, 9), (2, 3, 2, 3, 4), (3, 70, 2, 2)]


def _bn_ref(x, rm, rv, w, b, training, momentum, eps, residual=None, relu=False):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


BN_OPS = {
    "batch_norm": (PF.batch_norm, False, False),
    "batch_norm_relu": (PF.batch_norm_relu, True, False),
    "batch_norm_add_relu": (PF.batch_norm_add_relu, True, True),
}


def _bn_call(op, x, res, *args):
    fn, _, with_res = BN_OPS[op]
    return fn(x, res, *args) if with_res else fn(x, *args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=_sid)
@pytest.mark.parametrize("op", list(BN_OPS))
def test_batch_norm_matches_torch(target, op, shape, layout, training):
    _, relu, with_res = BN_OPS[op]
    x = _bn_input(shape, torch.float32, target.device, layout)
    if len(shape) == 5 and layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    res = make_input(shape, torch.float32, target.device, layout=layout) if with_res else None
    C = shape[1]
    w, b = _params((C,), torch.float32, target.device)
    rm, rv = _stats(C, torch.float32, target.device)
    rm64, rv64 = rm.double(), rv.double()
    out = _bn_call(op, x, res, rm, rv, w, b, training, 0.1, 1e-5)
    x64, w64, b64 = _double(x, w, b)
    ref = _bn_ref(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5,
                  None if res is None else res.double(), relu)  # fmt: skip
    expected = _bn_ref(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, res, relu)
    assert out.shape == x.shape and out.stride() == expected.stride()
    assert_close_to_ref(out, ref)
    # running stats: updated as torch updates them when training, untouched when not
    assert_close_to_ref(rm, rm64.float(), fp32_tol=1e-5)
    assert_close_to_ref(rv, rv64.float(), fp32_tol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(BN_OPS))
def test_batch_norm_dtypes(target, op, dtype, layout):
    _, relu, with_res = BN_OPS[op]
    shape = (3, 6, 5, 4)
    x = make_input(shape, dtype, target.device, layout=layout)
    res = make_input(shape, dtype, target.device, layout=layout) if with_res else None
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # as autocast keeps them
    w, b = _params((6,), pdt, target.device)
    rm, rv = _stats(6, pdt, target.device)
    rm_t, rv_t = rm.clone(), rv.clone()
    out = _bn_call(op, x, res, rm, rv, w, b, True, 0.1, 1e-5)
    ref = _bn_ref(*_double(x, rm_t, rv_t, w, b), True, 0.1, 1e-5,
                  None if res is None else res.double(), relu)  # fmt: skip
    expected = _bn_ref(x, rm_t, rv_t, w, b, True, 0.1, 1e-5, res, relu)
    assert out.dtype == dtype
    assert_close_to_ref(out, ref, expected)
    assert_close_to_ref(rm, rm_t, fp32_tol=1e-5)
    assert_close_to_ref(rv, rv_t, fp32_tol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_eval_batch_norm_of_a_bfloat16_model_sees_changed_statistics(target, layout):
    """A change in place to a bfloat16 module's weight, bias or running statistics must reach
    the next eval call, through a .data alias too (which bumps no version counter): the float
    copies they are converted to may not be reused on a version check alone."""
    bn = PN.BatchNorm2d(6).to(target.device, torch.bfloat16).eval()
    ref = torch.nn.BatchNorm2d(6).to(target.device, torch.bfloat16).eval()
    x = make_input((2, 6, 5, 7), torch.bfloat16, target.device, layout=layout)
    with torch.no_grad():
        for step in range(3):
            for m in (bn, ref):
                torch.manual_seed(step)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
            for alias_write in (False, True):
                if alias_write:  # between two calls, only .data writes
                    for m in (bn, ref):
                        m.running_mean.data.add_(1.0)
                        m.weight.data.mul_(2.0)
                expected = F.batch_norm(x.double(), *_double(ref.running_mean, ref.running_var,
                                        ref.weight, ref.bias), training=False)  # fmt: skip
                assert_close_to_ref(bn(x), expected, ref(x))


def test_batch_norm_without_running_stats_or_affine(target):
    x = make_input((4, 3, 2, 2), torch.float32, target.device)
    out = PF.batch_norm(x, None, None, training=True)
    assert_close_to_ref(out, F.batch_norm(x.double(), None, None, training=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_batch_norm_large_mean(target, dtype, layout):
    """Mean 1e4, spread 1: the variance must survive (no E[x^2] - E[x]^2)."""
    x = (1e4 + torch.randn(16, 4, 8, 8, device=target.device)).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(4, device=target.device), torch.ones(4, device=target.device)
    out = PF.batch_norm(x, rm, rv, training=True)
    rm64, rv64 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    ref = F.batch_norm(x.double().cpu(), rm64, rv64, training=True)
    torch_rm, torch_rv = torch.zeros(4, device=target.device), torch.ones(4, device=target.device)
    expected = F.batch_norm(x, torch_rm, torch_rv, training=True)
    assert_close_to_ref(out.cpu(), ref, expected.cpu(), fp32_tol=1e-3)
    assert_close_to_ref(rv.cpu(), rv64.float(), fp32_tol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(48, 3, 5, 5), (700, 2, 1, 3), (9, 2, 13, 11)], ids=_sid)
def test_batch_norm_short_planes(target, shape, dtype):
    """NCHW planes shorter than a reduction block go in segments of several planes (each with
    its own pivot, their ragged ends masked): several segments per channel, planes shorter
    than a vector, and segment starts far from the mean (the exact second pass) must all keep
    the statistics and gradients of a mean of 100 with a spread of 1. (The CPU kernels' walk;
    too slow for the Triton interpreter.)"""
    if target.backend == "triton" and target.device == "cpu":
        pytest.skip("CPU kernels' segments; the interpreter takes minutes on these sizes")
    x = 100 + torch.randn(shape, device=target.device)
    x[::8, :, 0, 0] += 6  # outlying pivots: the one-pass M2 would lose too much
    x = x.to(dtype)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = _params((shape[1],), pdt, target.device)
    rm, rv = _stats(shape[1], pdt, target.device)
    rm_t, rv_t = rm.clone(), rv.clone()
    rm64, rv64 = rm.double(), rv.double()
    out = PF.batch_norm(x, rm, rv, w, b, True)
    x64, w64, b64 = _double(x, w, b)
    ref = F.batch_norm(x64, rm64, rv64, w64, b64, True)
    expected = F.batch_norm(x, rm_t, rv_t, w, b, True)
    assert_close_to_ref(out, ref, expected)
    assert_close_to_ref(rv, rv64.to(pdt), fp32_tol=1e-5)

    def ours(x, w, b):
        return PF.batch_norm(x, None, None, w, b, True)

    def torch_bn(x, w, b):
        return F.batch_norm(x, None, None, w, b, True)

    _check_grads(ours, torch_bn, [x, w, b], lowp_fn=torch_bn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_batch_norm_nhwc_channel_blocks(target, dtype):
    """NHWC statistics go chunk by chunk (up to 256 rows) in blocks of channels summed in one
    pass around each channel's pivot: 43 channels are a block of four vectors, a vector and
    single channels (float32 and bfloat16; float64's vectors are half as wide), 594 rows several
    chunks.
    An outlying pivot in channel 5 sends its block through the exact second pass; a NaN in
    channel 41 stays there."""
    if target.backend == "triton" and target.device == "cpu":
        pytest.skip("CPU kernels' walk; the interpreter takes minutes on these sizes")
    shape = (6, 43, 9, 11)
    x = 100 + torch.randn(shape, device=target.device)
    x[0, 5, 0, 0] += 1000  # the pivot of channel 5: one pass would keep 1e-4 of its variance
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = _stats(shape[1], pdt, target.device)
    rm_t, rv_t, rm_nan, rv_nan = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    rm64, rv64 = _double(rm, rv)  # copies, also of float64
    out = PF.batch_norm(x, rm, rv, None, None, True)
    ref = F.batch_norm(x.double(), rm64, rv64, None, None, True)
    expected = F.batch_norm(x, rm_t, rv_t, None, None, True)
    assert_close_to_ref(out, ref, expected)
    assert_close_to_ref(rm, rm64.to(pdt), fp32_tol=1e-5)
    worst = ((rv.double() - rv64) / rv64).abs().max().item()  # per channel, not over all
    assert worst <= (1e-12 if dtype == torch.float64 else 1e-5), worst
    x[3, 41, 2, 2] = float("nan")
    PF.batch_norm(x, rm_nan, rv_nan, None, None, True)
    assert torch.isnan(rm_nan[41]) and torch.isnan(rv_nan[41])
    others = [c for c in range(shape[1]) if c != 41]
    assert torch.equal(rm_nan[others], rm[others]) and torch.equal(rv_nan[others], rv[others])


def test_batch_norm_nan_stays_in_its_channel(target):
    x = make_input((4, 3, 5, 5), torch.float32, target.device)
    x[1, 1, 2, 3] = float("nan")
    rm, rv = _stats(3, torch.float32, target.device)
    rm0, rv0 = rm.clone(), rv.clone()
    out = PF.batch_norm(x, rm, rv, training=True)
    assert torch.isnan(out[:, 1]).all()
    assert not torch.isnan(out[:, [0, 2]]).any()
    assert torch.isnan(rm[1]) and torch.isnan(rv[1])
    F.batch_norm(x, rm0, rv0, training=True)
    torch.testing.assert_close(rm[[0, 2]], rm0[[0, 2]])
    torch.testing.assert_close(rv[[0, 2]], rv0[[0, 2]])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("op", list(BN_OPS))
def test_batch_norm_grads(target, op, layout, training):
    _, relu, with_res = BN_OPS[op]
    shape = (3, 5, 4, 3)
    x = make_input(shape, torch.float32, target.device, layout=layout)
    res = make_input(shape, torch.float32, target.device, layout=layout) if with_res else None
    w, b = _params((5,), torch.float32, target.device)
    rm, rv = _stats(5, torch.float32, target.device)

    def ours(x, w, b, res):
        return _bn_call(op, x, res, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    def ref(x, w, b, res):
        return _bn_ref(x, rm.double(), rv.double(), w, b, training, 0.1, 1e-5, res, relu)

    _check_grads(ours, ref, [x, w, b, res])


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_batch_norm_low_precision_grads(target, dtype, layout):
    x = make_input((4, 6, 5, 5), dtype, target.device, layout=layout)
    w, b = _params((6,), torch.float32, target.device)

    def ours(x, w, b):
        return PF.batch_norm(x, None, None, w, b, True)

    def ref(x, w, b):
        return F.batch_norm(x, None, None, w, b, True)

    _check_grads(ours, ref, [x, w, b], lowp_fn=ref)


BF16_WALK_SHAPES = [(2, 32, 3, 5), (2, 20, 3, 4), (2, 3, 2, 3), (2, 5, 7, 7)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", BF16_WALK_SHAPES, ids=_sid)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("op", list(BN_OPS))
def test_batch_norm_bf16_walks(target, op, layout, shape, training):
    """bfloat16's elementwise walks, forward and backward: rows of C % 16 == 0 two vectors at a
    time with reordered coefficients (NHWC C = 32), rows with a ragged end (C = 20) or shorter
    than a vector, planes two vectors at a time with a ragged end (K = 15, 49), of one vector
    and a ragged end (K = 12) or shorter (K = 6); a NaN stays NaN where torch's does."""
    if target.backend == "triton" and target.device == "cpu":
        pytest.skip("CPU kernels' walks; slow in the Triton interpreter")
    _, relu, with_res = BN_OPS[op]
    C = shape[1]
    x = make_input(shape, torch.bfloat16, target.device, layout=layout)
    res = make_input(shape, torch.bfloat16, target.device, layout=layout) if with_res else None
    w, b = _params((C,), torch.float32, target.device)
    rm, rv = _stats(C, torch.float32, target.device)

    def ours(x, w, b, res):
        return _bn_call(op, x, res, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    def ref(x, w, b, res):  # running stats in w's dtype (float32 for bfloat16 x, as torch wants)
        return _bn_ref(x, rm.to(w.dtype, copy=True), rv.to(w.dtype, copy=True), w, b, training,
                       0.1, 1e-5, res, relu)  # fmt: skip

    out = ours(x, w, b, res)
    assert_close_to_ref(out, ref(*_double(x, w, b), None if res is None else res.double()),
                        ref(x, w, b, res))  # fmt: skip
    _check_grads(ours, ref, [x, w, b, res], lowp_fn=ref)
    x[-1, -1, -1, -1] = float("nan")
    assert torch.equal(torch.isnan(ours(x, w, b, res)), torch.isnan(ref(x, w, b, res)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("op", list(BN_OPS))
def test_batch_norm_of_a_low_precision_model(target, op, dtype, layout, training):
    """A float16/bfloat16 model keeps weight, bias and running statistics in its own dtype, and
    the kernels read them as stored (here mixed: the bias in float32): values, gradients (each
    in its parameter's dtype) and the running statistics' update against torch in float64."""
    _, relu, with_res = BN_OPS[op]
    shape = (3, 6, 5, 4)
    x = make_input(shape, dtype, target.device, layout=layout)
    res = make_input(shape, dtype, target.device, layout=layout) if with_res else None
    w, b_low = _params((6,), dtype, target.device)
    b = b_low.float()  # the same values
    rm, rv = _stats(6, dtype, target.device)
    rm_t, rv_t, rm64, rv64 = rm.clone(), rv.clone(), *_double(rm, rv)
    out = _bn_call(op, x, res, rm, rv, w, b, training, 0.1, 1e-5)
    ref = _bn_ref(*_double(x), rm64, rv64, *_double(w, b), training, 0.1, 1e-5,
                  None if res is None else res.double(), relu)  # fmt: skip
    expected = _bn_ref(x, rm_t, rv_t, w, b_low, training, 0.1, 1e-5, res, relu)
    assert out.dtype == dtype and rm.dtype == rv.dtype == dtype
    assert_close_to_ref(out, ref, expected)
    assert_close_to_ref(rm, rm64, rm_t)
    assert_close_to_ref(rv, rv64, rv_t)
    if not training:
        assert torch.equal(rm, rm_t) and torch.equal(rv, rv_t)

    def ours(x, w, b, res):
        return _bn_call(op, x, res, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    def ref_fn(x, w, b, res):
        return _bn_ref(x, rm.to(w.dtype, copy=True), rv.to(w.dtype, copy=True), w,
                       b.to(w.dtype), training, 0.1, 1e-5, res, relu)  # fmt: skip

    _check_grads(ours, ref_fn, [x, w, b, res], lowp_fn=ref_fn)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_in_place_ops_on_a_batch_norm_output(target, layout):
    """ResNet's += and relu_ on a training BatchNorm's output: torch's gradients, and the
    output is no view (autograd would copy the activation twice in backward for each in-place
    op on a view: CopySlices)."""
    x = make_input((3, 6, 5, 4), torch.float32, target.device, layout=layout)
    r = make_input((3, 6, 5, 4), torch.float32, target.device, layout=layout)
    w, b = _params((6,), torch.float32, target.device)
    nodes = []

    def ours(x, w, b, r):
        y = PF.batch_norm(x, None, None, w, b, True)
        assert y._base is None and y.stride() == x.stride()
        y += r  # a bottleneck block's tail
        y.relu_()
        nodes.append(type(y.grad_fn).__name__)
        return y

    def ref(x, w, b, r):
        return F.batch_norm(x, None, None, w, b, True).add_(r).relu_()

    _check_grads(ours, ref, [x, w, b, r])
    assert nodes == ["ReluBackward0"], nodes


def test_eval_batch_norm_of_a_bfloat16_model_converts_nothing(target):
    """Eval BatchNorm of a bfloat16 model is one op: its weight, bias and running statistics
    go to the kernel as stored (converting them was four more launches per call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:  # views launch nothing
                self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    bn = PN.BatchNorm2d(6).to(target.device, torch.bfloat16).eval()
    x = make_input((2, 6, 5, 7), torch.bfloat16, target.device, layout="nhwc")
    with torch.no_grad(), Ops() as ops:
        bn(x)
    assert ops.seen == ["pykern.batch_norm_fwd"], ops.seen


@pytest.mark.parametrize("op", list(BN_OPS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_gradcheck(target, op, training):
    _, _, with_res = BN_OPS[op]
    x = make_input((3, 2, 2, 3), torch.float64, target.device, requires_grad=True)
    res = make_input((3, 2, 2, 3), torch.float64, target.device, requires_grad=True)
    w, b = (_leaf(t) for t in _params((2,), torch.float64, target.device))
    rm, rv = _stats(2, torch.float64, target.device)
    fn = lambda x, w, b, r: _bn_call(op, x, r if with_res else None, rm.clone(), rv.clone(),  # noqa: E731
                                     w, b, training)  # fmt: skip
    assert torch.autograd.gradcheck(fn, (x, w, b, res), fast_mode=target.backend == "triton")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batch_norm_empty_batch(target, training):
    # as torch: an empty result, running stats untouched, zero gradients for weight and bias
    x = make_input((0, 3, 4, 4), torch.float32, target.device, requires_grad=True)
    w = torch.randn(3, device=target.device, requires_grad=True)
    b = torch.randn(3, device=target.device, requires_grad=True)
    rm, rv = _stats(3, torch.float32, target.device)
    rm0, rv0 = rm.clone(), rv.clone()
    y = PF.batch_norm(x, rm, rv, w, b, training=training)
    assert y.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))
    assert torch.equal(db, torch.zeros_like(b))


def test_empty_norms_keep_dtype_and_format_and_give_zero_parameter_gradients():
    # a bfloat16 input with float32 parameters (autocast's mix) stays bfloat16, as in torch
    x = torch.randn(0, 3, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    for y in (PF.batch_norm(x, None, None, w, b, training=True), PF.layer_norm_2d(x, w, b)):
        expected = torch.nn.functional.batch_norm(x, None, None, w, b, training=True)
        assert y.shape == x.shape and y.dtype == expected.dtype == torch.bfloat16
        assert y.is_contiguous(memory_format=torch.channels_last)
        dw, db = torch.autograd.grad(y.sum(), (w, b))
        assert torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3))


# Modules


def test_batch_norm_modules_match_torch(target):
    for momentum in (0.1, None):
        ours = PN.BatchNorm2d(6, momentum=momentum).to(target.device)
        theirs = torch.nn.BatchNorm2d(6, momentum=momentum).to(target.device)
        ours.load_state_dict(theirs.state_dict())
        for _ in range(3):
            x = make_input((4, 6, 3, 3), torch.float32, target.device)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6)
        ours.eval(), theirs.eval()
        x = make_input((2, 6, 3, 3), torch.float32, target.device)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_fused_batch_norm_modules_load_a_batch_norm_state_dict(target):
    bn = torch.nn.BatchNorm2d(4).to(target.device)
    bn.train()(make_input((3, 4, 2, 2), torch.float32, target.device))  # non-trivial stats
    x = make_input((3, 4, 5, 5), torch.float32, target.device, layout="nhwc")
    r = make_input((3, 4, 5, 5), torch.float32, target.device)
    relu = PN.BatchNormReLU2d(4).to(target.device).eval()
    relu.load_state_dict(bn.state_dict())
    add_relu = PN.BatchNormAddReLU2d(4).to(target.device).eval()
    add_relu.load_state_dict(bn.state_dict())
    bn.eval()
    torch.testing.assert_close(relu(x), F.relu(bn(x)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(add_relu(x, r), F.relu(bn(x) + r), rtol=1e-4, atol=1e-5)


def test_norm_modules_match_torch(target):
    pairs = [
        (PN.LayerNorm((4, 9)), torch.nn.LayerNorm((4, 9))),
        (
            PN.LayerNorm(9, elementwise_affine=False),
            torch.nn.LayerNorm(9, elementwise_affine=False),
        ),
        (PN.RMSNorm(9, eps=1e-6), torch.nn.RMSNorm(9, eps=1e-6)),
    ]
    x = make_input((3, 4, 9), torch.float32, target.device)
    for ours, theirs in pairs:
        theirs.to(target.device)
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn_like(p))
        ours.to(target.device).load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    ln2d = PN.LayerNorm2d(5).to(target.device)
    assert set(ln2d.state_dict()) == {"weight", "bias"}
    img = make_input((2, 5, 3, 3), torch.float32, target.device)
    torch.testing.assert_close(ln2d(img), _ln2d_ref(img, ln2d.weight, ln2d.bias), rtol=1e-4,
                               atol=1e-5)  # fmt: skip


# opcheck and torch.compile


def test_opcheck(target):
    dev = target.device
    x = make_input((3, 5, 4), torch.float32, dev)
    r = make_input((3, 5, 4), torch.float32, dev)
    w, b = torch.randn(5, device=dev), torch.randn(5, device=dev)
    ops = torch.ops.pykern
    torch.library.opcheck(ops.row_norm_fwd.default, (x, r, w, b, 1e-5, False))
    torch.library.opcheck(ops.row_norm_fwd.default, (x, None, w, None, 1e-5, True))
    y, s, mean, rstd = ops.row_norm_fwd(x, r, w, b, 1e-5, False)
    torch.library.opcheck(ops.row_norm_bwd.default, (r, s, w, mean, rstd, x, False, True, True))
    mean, var = ops.batch_norm_stats(x)
    torch.library.opcheck(ops.batch_norm_stats.default, (x,))
    torch.library.opcheck(ops.batch_norm_fwd.default, (x, mean, var, w, b, r, 1e-5, True))
    y = ops.batch_norm_fwd(x, mean, var, w, b, r, 1e-5, True)
    torch.library.opcheck(ops.batch_norm_bwd_reduce.default, (r, x, y, mean, var, 1e-5))
    sums = ops.batch_norm_bwd_reduce(r, x, y, mean, var, 1e-5)
    torch.library.opcheck(
        ops.batch_norm_bwd.default, (r, x, y, mean, var, w, *sums, 1e-5, 12, True)
    )


def test_batch_norm_ops_take_vectors_in_the_input_dtype(target):
    """The BatchNorm ops take mean, var, weight and bias in acc or in x's dtype, each on its
    own (a bfloat16 model's parameters, fed as stored): opcheck, the same values as their
    float32 copies, and a third dtype refused with the vector named."""
    dev, ops = target.device, torch.ops.pykern
    x = make_input((3, 5, 4), torch.bfloat16, dev)
    r = make_input((3, 5, 4), torch.bfloat16, dev)
    w, b = torch.randn(5, device=dev).bfloat16(), torch.randn(5, device=dev)
    mean, var = ops.batch_norm_stats(x)
    rm, rv = mean.bfloat16(), var.bfloat16()
    torch.library.opcheck(ops.batch_norm_fwd.default, (x, rm, var, w, b, r, 1e-5, True))
    y = ops.batch_norm_fwd(x, rm, var, w, b, r, 1e-5, True)
    assert torch.equal(y, ops.batch_norm_fwd(x, rm.float(), var, w.float(), b, r, 1e-5, True))
    torch.library.opcheck(ops.batch_norm_bwd_reduce.default, (r, x, y, rm, rv, 1e-5))
    sums = ops.batch_norm_bwd_reduce(r, x, y, rm, rv, 1e-5)
    sums_ref = ops.batch_norm_bwd_reduce(r, x, y, rm.float(), rv.float(), 1e-5)
    assert all(map(torch.equal, sums, sums_ref))
    for count in (12, 0):
        args = (r, x, y, rm, rv, w, *sums, 1e-5, count, True)
        torch.library.opcheck(ops.batch_norm_bwd.default, args)
        dx, _ = ops.batch_norm_bwd(*args)
        dx_ref, _ = ops.batch_norm_bwd(r, x, y, rm.float(), rv.float(), w.float(), *sums, 1e-5,
                                       count, True)  # fmt: skip
        assert torch.equal(dx, dx_ref)
    with pytest.raises((TypeError, ValueError), match="weight"):
        ops.batch_norm_fwd(x, mean, var, w.half(), b, r, 1e-5, False)
    with pytest.raises((TypeError, ValueError), match="sum_dy"):
        ops.batch_norm_bwd(r, x, y, rm, rv, w, sums[0].bfloat16(), sums[1], 1e-5, 12, True)


def test_compile_fullgraph(target):
    dev = target.device

    def make_model():
        torch.manual_seed(1)
        ln, bn = PN.LayerNorm(8).to(dev), PN.BatchNormAddReLU2d(3).to(dev)

        def model(x):
            y = bn(ln(x), x)
            y, s = PF.add_rms_norm(y, x, 8, None, 1e-6)
            return PF.layer_norm_2d(y + s)

        return model, bn

    x = make_input((2, 3, 4, 8), torch.float32, dev, requires_grad=True)
    eager, bn_eager = make_model()
    ref = eager(x)
    model, bn = make_model()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, bn_eager.running_var)  # updated once, in graph
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


# SyncBatchNorm


def _sync_worker(rank, world, tmp, x, g, first_share):
    """One rank of the SyncBatchNorm test: its share of the batch (rank 0 the first
    first_share images) through pykern's SyncBatchNorm, results saved to tmp/rank<r>.pt."""
    import datetime

    import torch.distributed as dist

    init = f"file://{os.path.join(tmp, 'init')}"
    # a rank left waiting on a collective fails after the timeout rather than hanging the run
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timeout)
    try:
        bn = PN.SyncBatchNorm(x.shape[1]).double()
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1]))
            bn.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
        share = slice(0, first_share) if rank == 0 else slice(first_share, x.shape[0])
        xs = x[share].clone().requires_grad_(True)
        y = bn(xs)
        y.backward(g[share])
        result = {"y": y.detach(), "dx": xs.grad, "dw": bn.weight.grad, "db": bn.bias.grad}
        result.update(running_mean=bn.running_mean, running_var=bn.running_var)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# 3 + 3 images; 6 + 0: a rank with an empty batch still joins the others' collectives
@pytest.mark.parametrize("first_share", [3, 6], ids=["halves", "one-rank-empty"])
def test_sync_batch_norm_two_processes_match_one_process_on_the_whole_batch(first_share):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64)
    g = torch.randn_like(x)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sync_worker, args=(2, tmp, x, g, first_share), nprocs=2, join=True)
        result = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    ref_bn = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        ref_bn.weight.copy_(torch.linspace(0.5, 1.5, 4))
        ref_bn.bias.copy_(torch.linspace(-1, 1, 4))
    xr = x.clone().requires_grad_(True)
    y = ref_bn(xr)
    y.backward(g)
    torch.testing.assert_close(torch.cat([result[0]["y"], result[1]["y"]]), y.detach())
    torch.testing.assert_close(torch.cat([result[0]["dx"], result[1]["dx"]]), xr.grad)
    # each rank's parameter gradient is its own share; DDP sums/averages them across ranks
    torch.testing.assert_close(result[0]["dw"] + result[1]["dw"], ref_bn.weight.grad)
    torch.testing.assert_close(result[0]["db"] + result[1]["db"], ref_bn.bias.grad)
    for r in result:
        torch.testing.assert_close(r["running_mean"], ref_bn.running_mean)
        torch.testing.assert_close(r["running_var"], ref_bn.running_var)


def test_convert_sync_batchnorm():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.BatchNorm1d(4)),
    )
    model[1].running_mean.fill_(0.5)
    converted = PN.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is PN.SyncBatchNorm and type(converted[2][0]) is PN.SyncBatchNorm
    assert converted[1].weight is model[1].weight
    assert torch.equal(converted[1].running_mean, torch.full((4,), 0.5))
    assert set(converted.state_dict()) == set(model.state_dict())
    x = make_input((2, 4, 3, 3), torch.float32)
    ref = torch.nn.BatchNorm2d(4).eval()
    ref.load_state_dict(converted[1].state_dict())
    torch.testing.assert_close(converted[1].eval()(x), ref(x))


# Bad input: a clear exception naming the argument, and running stats left as they were


def _bad_cases():
    x = torch.randn(4, 3, 5, 5)
    C3 = torch.ones(3)
    return [
        (lambda: PF.batch_norm(x, torch.zeros(4), C3, training=True), ValueError, "running_mean"),
        (lambda: PF.batch_norm(x, C3, C3, torch.ones(2)), ValueError, "weight"),
        (lambda: PF.batch_norm(x, C3, C3, None, torch.ones(5)), ValueError, "bias"),
        (lambda: PF.batch_norm(x, None, None), ValueError, "running_mean"),
        (
            lambda: PF.batch_norm(torch.randn(1, 3), None, None, training=True),
            ValueError,
            "more than 1 value per channel",
        ),  # fmt: skip
        (lambda: PF.batch_norm(x.int(), C3, C3), TypeError, "input"),
        (lambda: PF.batch_norm(x, C3.double(), C3), TypeError, "running_mean"),
        (lambda: PF.batch_norm(x, C3, C3, C3.to("meta")), ValueError, "weight"),
        (lambda: PF.batch_norm(torch.randn(3), None, None, training=True), ValueError, "input"),
        (lambda: PF.batch_norm_add_relu(x, x[:2], C3, C3), ValueError, "residual"),
        (lambda: PF.batch_norm(x, C3, C3, momentum="fast"), TypeError, "momentum"),
        (lambda: PF.layer_norm(x, (4, 5)), ValueError, "normalized_shape"),
        (lambda: PF.layer_norm(x, "5"), TypeError, "normalized_shape"),
        (lambda: PF.layer_norm(x, 5, torch.ones(4)), ValueError, "weight"),
        (lambda: PF.layer_norm(x, 5, torch.ones(5, dtype=torch.float64)), TypeError, "weight"),
        (lambda: PF.layer_norm(x.long(), 5), TypeError, "input"),
        (lambda: PF.rms_norm(x, 5, torch.ones(6)), ValueError, "weight"),
        (lambda: PF.add_layer_norm(x, x.half(), 5), ValueError, "residual"),
        (lambda: PF.layer_norm_2d(x, torch.ones(5)), ValueError, "weight"),
        (lambda: PF.layer_norm_2d(x[0]), ValueError, "input"),
        (lambda: PF.layer_norm([1.0], 1), TypeError, "input"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    fn, error, match = _bad_cases()[case]
    with pytest.raises(error, match=match):
        fn()


def test_refused_calls_leave_running_stats_untouched():
    bn = PN.BatchNorm2d(3, momentum=None)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    for bad in (torch.randn(1, 3, 1, 1), torch.randn(2, 3, 4, 4).int(), torch.randn(2, 4, 3, 3)):
        with pytest.raises((ValueError, TypeError)):
            bn(bad)
    with pytest.raises(ValueError, match="residual"):
        PN.BatchNormAddReLU2d(3)(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 1))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed by a refused call"
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="weight"):
        PF.batch_norm(torch.randn(4, 3, 2, 2), rm, rv, torch.ones(4), training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.bfloat16])
def test_running_stats_update_in_place_like_torch(stats_dtype):
    # The running stats are updated in place (one C++ call on CPU): the same values as torch's
    # update, strided running stats included, and autograd sees the in-place change.
    x = make_input((4, 6, 3, 3), torch.bfloat16 if stats_dtype == torch.bfloat16 else torch.float32)
    for stride in (1, 2):
        rm = torch.randn(6 * stride, dtype=stats_dtype)[::stride]
        rv = (torch.rand(6 * stride, dtype=stats_dtype) + 0.5)[::stride]
        rm_ref, rv_ref = rm.clone(), rv.clone()
        PF.batch_norm(x, rm, rv, training=True, momentum=0.3)
        F.batch_norm(x, rm_ref, rv_ref, training=True, momentum=0.3)
        tol = dict(rtol=0, atol=0.02) if stats_dtype == torch.bfloat16 else {}  # 1 bf16 ulp
        torch.testing.assert_close(rm, rm_ref, **tol)
        torch.testing.assert_close(rv, rv_ref, **tol)
    w = torch.randn(6, requires_grad=True)
    rm = torch.zeros(6)
    loss = (w * rm).sum()  # saves rm for backward
    PF.batch_norm(x, rm, None, training=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


RUNNING_DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),  # two dtypes: a launch each
    (torch.float64, torch.float64),
]


@pytest.mark.parametrize("dtypes", RUNNING_DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_batch_norm_update_running_op(target, dtypes):
    """pykern::batch_norm_update_running, a training call's one launch for both running
    statistics: torch's rule in acc rounded once, either one absent, versions bumped (autograd
    sees the write), opcheck, and a refused call leaves both as they were."""
    dev, ops = target.device, torch.ops.pykern
    C, (dm, dv) = 37, dtypes
    mean = torch.randn(C, device=dev, dtype=torch.float64 if dm == torch.float64 else torch.float32)
    var = torch.rand(C, device=dev, dtype=mean.dtype) + 0.5
    rm, rv = torch.randn(C, device=dev).to(dm), (torch.rand(C, device=dev) + 0.5).to(dv)
    expect_m = (0.7 * rm.double() + 0.3 * mean.double()).to(dm)
    expect_v = (0.7 * rv.double() + 0.3 * 1.25 * var.double()).to(dv)
    versions = rm._version, rv._version
    ops.batch_norm_update_running(mean, var, rm, rv, 0.3, 1.25)
    assert rm._version > versions[0] and rv._version > versions[1]
    # a few roundings of terms up to about 4 in size: absolute, as keep * r + take * b cancels
    eps = {torch.float64: 1e-15, torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}
    tol = {dt: dict(rtol=e, atol=4 * e) for dt, e in eps.items()}
    torch.testing.assert_close(rm, expect_m, **tol[dm])
    torch.testing.assert_close(rv, expect_v, **tol[dv])
    rv_before = rv.clone()
    ops.batch_norm_update_running(mean, var, None, rv, 0.5, 1.0)
    torch.testing.assert_close(rv, (0.5 * rv_before.double() + 0.5 * var.double()).to(dv),
                               **tol[dv])  # fmt: skip
    args = (mean, var, rm.clone(), rv.clone(), 0.3, 1.25)
    torch.library.opcheck(ops.batch_norm_update_running.default, args)
    rm_before, rv_before = rm.clone(), rv.clone()
    with pytest.raises((ValueError, TypeError), match="running_var"):
        ops.batch_norm_update_running(mean, var, rm, rv[:5], 0.3, 1.25)
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)


def test_count_helper_is_consistent():
    # the unbiased running variance divides by count - 1 with count = N * spatial
    x = torch.randn(3, 2, 4, 5)
    rv = torch.zeros(2)
    PF.batch_norm(x, None, rv, training=True, momentum=1.0)
    n = math.prod(x.shape) // 2
    torch.testing.assert_close(rv, x.transpose(0, 1).reshape(2, n).var(1, unbiased=True))
