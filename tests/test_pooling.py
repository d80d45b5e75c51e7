"""Pooling family (so far: global average/max pooling and channel pooling).

Sections as in every family: values and strides against a float64 reference (torch's op on
upcast input) by DESIGN.md's tolerance rule, gradients, opcheck, torch.compile, bad input.
Outputs are poisoned first (conftest).
"""

import pytest
import torch
import torch.nn.functional as F

import pykern
import pykern.functional as PF
from tests.helpers import assert_close_to_ref, grads_against_torch, make_input

OPS = {
    # name: (pykern op, torch reference)
    "global_avg_pool2d": (PF.global_avg_pool2d, lambda x: F.adaptive_avg_pool2d(x, 1)),
    "global_max_pool2d": (PF.global_max_pool2d, lambda x: F.adaptive_max_pool2d(x, 1)),
    "channel_pool_avg": (lambda x: PF.channel_pool(x, "avg"), lambda x: x.mean(-3, keepdim=True)),
    "channel_pool_max": (lambda x: PF.channel_pool(x, "max"), lambda x: x.amax(-3, keepdim=True)),
}
# Odd sizes, batch 1, sizes of 1, C much larger than H*W and the reverse, zero batch.
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 70, 3, 3), (2, 5, 17, 33), (1, 130, 1, 2), (0, 4, 3, 3)]
LAYOUTS = ["nchw", "nhwc"]


def _sid(shape):
    return "x".join(map(str, shape))


def _check(target, op, shape, dtype, layout, noncontig=False):
    fn, ref_fn = OPS[op]
    x = make_input(shape, dtype, target.device, layout=layout, noncontig=noncontig)
    out = fn(x)
    ref = ref_fn(x.double())
    expected = ref_fn(x)  # torch in the same precision: its error sets the low-precision bar
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.stride() == expected.stride(), f"strides {out.stride()} != {expected.stride()}"
    if out.numel():
        assert_close_to_ref(out, ref, torch_lowp=expected)


# Values and strides


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("op", list(OPS))
def test_matches_torch(target, op, shape, layout):
    _check(target, op, shape, torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_dtypes(target, op, dtype, layout):
    _check(target, op, (2, 37, 6, 11), dtype, layout)


@pytest.mark.parametrize("op", list(OPS))
def test_noncontiguous_and_unbatched(target, op):
    _check(target, op, (2, 6, 5, 7), torch.float32, "nchw", noncontig=True)
    _check(target, op, (6, 5, 7), torch.float32, "nchw")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["global_max_pool2d", "channel_pool_max"])
def test_max_propagates_nan_and_keeps_first_of_ties(target, op, layout):
    fn, ref_fn = OPS[op]
    x = make_input((2, 12, 3, 5), torch.float32, target.device, layout=layout)
    x[0, 1, 1, 2] = float("nan")
    x[0, 2, 1, 2] = float("nan")
    x[1] = 1.0  # every element ties
    assert torch.equal(fn(x).isnan(), ref_fn(x).isnan())
    torch.testing.assert_close(fn(x), ref_fn(x), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fill", ["ties", "all_minus_inf"])
def test_max_gradient_goes_to_torchs_index(target, fill, layout):
    x = make_input((2, 3, 4, 5), torch.float32, target.device, layout=layout)
    if fill == "ties":
        x[:, :, 1:3, 2:4] = 7.0  # torch routes the gradient to the first of the ties
    else:
        x[:, 1] = float("-inf")  # torch's index is the first element
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    PF.global_max_pool2d(x).sum().backward()
    F.adaptive_max_pool2d(x_ref, 1).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


# Gradients


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", list(OPS))
def test_gradcheck(target, op, layout):
    fn, _ = OPS[op]
    x = make_input((2, 3, 2, 3), torch.float64, target.device, layout=layout, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", list(OPS))
def test_grad_matches_torch(target, op, layout):
    fn, ref_fn = OPS[op]
    x = make_input((2, 9, 5, 6), torch.float32, target.device, layout=layout)
    grad, ref_grad = grads_against_torch(fn, ref_fn, x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert grad.stride() == ref_grad.stride()


# opcheck


@pytest.mark.parametrize("is_max", [False, True], ids=["avg", "max"])
def test_opcheck(target, is_max):
    x = make_input((3, 7, 5), torch.float32, target.device)
    for view in (x, x.transpose(1, 2), x[:, :, ::2]):
        torch.library.opcheck(torch.ops.pykern.pool_reduce_fwd.default, (view, is_max))
    out, indices = torch.ops.pykern.pool_reduce_fwd(x, is_max)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pykern.pool_reduce_bwd.default, (grad, indices, 7, is_max))


# torch.compile


@pytest.mark.parametrize("op", list(OPS))
def test_compile_fullgraph(target, op):
    fn, ref_fn = OPS[op]
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: fn(x * 2.0), fullgraph=True, backend="aot_eager")
    x = make_input((2, 3, 5, 7), torch.float32, target.device, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, ref_fn(x.detach() * 2.0))
    out.sum().backward()
    assert x.grad is not None and not x.grad.isnan().any()


# Modules


def test_modules():
    x = make_input((2, 4, 5, 6), torch.float32)
    torch.testing.assert_close(pykern.nn.GlobalAvgPool2d()(x), F.adaptive_avg_pool2d(x, 1))
    torch.testing.assert_close(pykern.nn.GlobalMaxPool2d()(x), F.adaptive_max_pool2d(x, 1))
    torch.testing.assert_close(pykern.nn.ChannelPool("max")(x), x.amax(1, keepdim=True))
    assert "mode='max'" in repr(pykern.nn.ChannelPool("max"))
    with pytest.raises(ValueError, match="ChannelPool: mode must be 'avg' or 'max'"):
        pykern.nn.ChannelPool("sum")


# Bad input


@pytest.mark.parametrize("op", ["global_avg_pool2d", "global_max_pool2d", "channel_pool"])
def test_bad_input(op):
    fn = getattr(PF, op)
    with pytest.raises(TypeError, match=f"{op}: input must be a torch.Tensor"):
        fn([1.0])
    with pytest.raises(ValueError, match=f"{op}: input must be 3D .* got a 2D tensor"):
        fn(torch.randn(3, 4))
    with pytest.raises(ValueError, match=f"{op}: input must be 3D .* got a 5D tensor"):
        fn(torch.randn(1, 2, 3, 4, 5))
    with pytest.raises(TypeError, match=f"{op}: input must be a floating-point tensor"):
        fn(torch.ones(1, 2, 3, 3, dtype=torch.int64))
    empty = torch.randn(2, 0, 3, 3) if op == "channel_pool" else torch.randn(2, 3, 0, 3)
    with pytest.raises(ValueError, match=f"{op}: input must have non-zero"):
        fn(empty)
    if op == "channel_pool":
        with pytest.raises(ValueError, match="channel_pool: mode must be 'avg' or 'max'"):
            fn(torch.randn(1, 2, 3, 3), mode="sum")
