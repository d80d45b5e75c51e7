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


# 64 and 32 channels: the CPU's NHWC global pooling keeps them in vector registers (sums 64,
# maxima 32); channel pooling takes 4 pixels' channels side by side.
@pytest.mark.parametrize("channels", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_register_blocks(target, op, dtype, channels):
    _check(target, op, (2, channels, 3, 5), dtype, "nhwc")


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


def _serial_max(run):
    """torch's serial max rule over one run: a later value wins if greater or NaN."""
    best, at = float("-inf"), 0
    for i, v in enumerate(run.tolist()):
        if v > best or v != v:
            best, at = v, i
    return at


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R", [8, 64, 75, 300])  # short and long runs, with and without a tail
def test_reduce_max_index_follows_the_serial_rule(target, R, dtype):
    # Runs along dim 1 of (B, R, 1), as channel pooling of NHWC and global pooling of NCHW are.
    x = torch.randn(9, R, 1, dtype=dtype, device=target.device)
    x[1] = 2.0  # every element ties: the first
    x[2, R // 3] = float("nan")  # NaNs: the last one, wherever the lanes put it
    x[2, R // 2] = float("nan")
    x[3] = float("-inf")  # all -inf: the first
    x[4, 0], x[4, R - 1] = float("inf"), float("-inf")  # +inf and -inf, no NaN
    x[5, R // 4 :: 3] = 5.0  # ties in different lanes: the first
    x[6, R - 1] = float("nan")  # a NaN in the last element
    x[7, 0] = float("nan")  # a NaN in the first element
    x[8, 1::2] = -0.0  # -0.0 / +0.0 ties keep the first one's sign
    x[8, 0::2] = 0.0
    out, indices = torch.ops.pykern.pool_reduce_fwd(x, True, True)
    expected = torch.tensor([[_serial_max(run)] for run in x[:, :, 0].float()])
    assert torch.equal(indices.cpu(), expected)
    picked = x.gather(1, expected.to(x.device)[:, :, None])[:, 0]
    assert torch.equal(out.isnan(), picked.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(picked))
    assert torch.equal(out[8].signbit(), picked[8].signbit())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R", [8, 13, 64, 255, 256, 300, 2048])  # groups of 8 runs, long runs
@pytest.mark.parametrize("K", [1, 3])  # K = 1: the CPU's values-only paths; K = 3 the others
def test_reduce_max_without_indices_is_the_same_element(target, R, K, dtype):
    # Without indices (a forward under no_grad) the maxima must be the very elements the index
    # path picks: the last NaN of a run, the first zero's sign, each as its bits.
    x = torch.randn(19, R, K, dtype=dtype, device=target.device)  # 19: two groups of 8 and 3
    x[1] = 2.0  # every element ties
    x[2, R // 3] = float("nan")
    x[2, R // 2] = -float("nan")  # the last NaN's bits (its sign) are the ones kept
    x[3] = float("-inf")
    x[4, 0], x[4, R - 1] = float("inf"), float("-inf")
    x[5, R - 1] = float("nan")  # in the last element, which the overlapping last step reads twice
    x[6] = -x[6].abs()
    x[6, 1::2] = -0.0  # a maximum of zero: the first zero's sign, here -0.0 ...
    x[7] = -x[7].abs()
    x[7, R // 2 :] = 0.0  # ... and here +0.0 after negatives
    x[8, 0] = float("nan")  # in the first element
    values, empty = torch.ops.pykern.pool_reduce_fwd(x, True, False)
    expected = torch.ops.pykern.pool_reduce_fwd(x, True, True)[0]
    assert empty.shape == (0, K)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    assert torch.equal(values.view(bits), expected.view(bits))
    torch.testing.assert_close(values, x.amax(1), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R", [8, 49, 75, 300])
def test_reduce_mean_of_a_run_does_not_depend_on_its_neighbours(target, R, dtype):
    # The CPU takes runs of 8 to 1023 elements 8 at a time, and the last few (19 = 2 * 8 + 3) one
    # by one: a run must give the same bits either way.
    x = torch.randn(19, R, 1, dtype=dtype, device=target.device)
    together = torch.ops.pykern.pool_reduce_fwd(x, False, False)[0]
    alone = torch.cat(
        [torch.ops.pykern.pool_reduce_fwd(x[b : b + 1], False, False)[0] for b in range(19)]
    )
    assert torch.equal(together, alone)
    assert_close_to_ref(together, x.double().mean(1), torch_lowp=x.mean(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("K", [75, 59])
@pytest.mark.parametrize("R", [3, 4, 49])
def test_reduce_max_index_follows_the_serial_rule_across_columns(target, R, K, dtype):
    # Columns along dim 2 of (B, R, K), as global pooling of NHWC: K = 75 takes the CPU's
    # register blocks of 32 and 8 columns and 3 columns row by row; K = 59 a block of 32, one of
    # 24 and 3 columns (sums: one block of 56).
    x = torch.randn(2, R, K, dtype=dtype, device=target.device)
    x[0, :, 1] = 2.0  # every element ties: the first
    x[0, :, 40] = float("-inf")  # all -inf: the first
    x[0, R - 1, 7] = x[0, 0, 7] = 9.0  # a tie between the first and last rows
    x[0, 1::2, 50] = -0.0  # -0.0 / +0.0 ties keep the first one's sign
    x[0, 0::2, 50] = 0.0
    x[1, R // 2, 33] = float("nan")  # NaNs: the last one, in one column of a block
    x[1, R - 1, 33] = float("nan")
    out, indices = torch.ops.pykern.pool_reduce_fwd(x, True, True)
    runs = x.transpose(1, 2).reshape(-1, R).float()
    expected = torch.tensor([_serial_max(run) for run in runs]).view(2, K)
    assert torch.equal(indices.cpu(), expected)
    picked = x.gather(1, expected.to(x.device)[:, None, :])[:, 0]
    assert torch.equal(out.isnan(), picked.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(picked))
    assert torch.equal(out[0].signbit(), picked[0].signbit())
    y = torch.randn(2, R, K, dtype=dtype, device=target.device)
    means = torch.ops.pykern.pool_reduce_fwd(y, False, False)[0]
    assert_close_to_ref(means, y.double().mean(1), torch_lowp=y.mean(1))


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
        for with_indices in (False, True):
            args = (view, is_max, with_indices)
            torch.library.opcheck(torch.ops.pykern.pool_reduce_fwd.default, args)
    out, indices = torch.ops.pykern.pool_reduce_fwd(x, is_max, True)
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


# Windowed pooling: max_pool2d, avg_pool2d, adaptive_avg_pool2d, adaptive_max_pool2d.
#
# Each case: (op, input shape, keyword arguments). Shapes are odd and small (the Triton
# interpreter runs them too); arguments cover stride < kernel (overlapping windows), padding,
# dilation, ceil_mode with a last window over the padding, count_include_pad, divisor_override,
# and adaptive sizes above and below the input.
def _torch_on_cpu(torch_fn):
    """torch_fn run on a CPU copy of x, its results moved back to x's device (autograd flows
    through both copies). torch's CPU pooling is the reference on every target: on the GPU,
    torch 2.11 refuses integer max_pool2d, returns index 0 for all -inf channels_last windows,
    and its channels_last avg_pool2d backward is wrong when padding > 0 (pytorch#188344)."""

    def run(x, **kw):
        # x's very strides: Tensor.cpu() may lay a non-dense tensor out anew.
        x_cpu = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(x)
        result = torch_fn(x_cpu, **kw)
        if isinstance(result, tuple):
            return tuple(r.to(x.device) for r in result)
        return result.to(x.device)

    return run


WINDOW_OPS = {
    "max_pool2d": (
        lambda x, **kw: PF.max_pool2d(x, return_indices=True, **kw),
        _torch_on_cpu(lambda x, **kw: F.max_pool2d(x, return_indices=True, **kw)),
    ),
    "avg_pool2d": (PF.avg_pool2d, _torch_on_cpu(F.avg_pool2d)),
    "adaptive_avg_pool2d": (PF.adaptive_avg_pool2d, _torch_on_cpu(F.adaptive_avg_pool2d)),
    "adaptive_max_pool2d": (
        lambda x, **kw: PF.adaptive_max_pool2d(x, return_indices=True, **kw),
        _torch_on_cpu(lambda x, **kw: F.adaptive_max_pool2d(x, return_indices=True, **kw)),
    ),
}
WINDOW_CASES = [
    ("max_pool2d", (2, 3, 9, 11), dict(kernel_size=3, stride=2, padding=1)),
    ("max_pool2d", (1, 5, 7, 6), dict(kernel_size=2)),
    ("max_pool2d", (2, 4, 10, 9), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1),
                                       dilation=(2, 3), ceil_mode=True)),
    ("max_pool2d", (1, 3, 8, 8), dict(kernel_size=3, stride=3, padding=1, ceil_mode=True)),
    ("max_pool2d", (2, 2, 5, 5), dict(kernel_size=5, stride=1, padding=2)),
    ("max_pool2d", (1, 1, 1, 1), dict(kernel_size=1)),
    ("avg_pool2d", (2, 3, 9, 11), dict(kernel_size=3, stride=2, padding=1)),
    ("avg_pool2d", (2, 3, 9, 11), dict(kernel_size=3, stride=2, padding=1,
                                       count_include_pad=False)),
    ("avg_pool2d", (1, 4, 8, 7), dict(kernel_size=(2, 4), stride=(3, 2), padding=(1, 2),
                                      ceil_mode=True)),
    ("avg_pool2d", (1, 4, 8, 7), dict(kernel_size=(2, 4), stride=(3, 2), padding=(1, 2),
                                      ceil_mode=True, count_include_pad=False)),
    ("avg_pool2d", (2, 3, 7, 7), dict(kernel_size=3, stride=2, divisor_override=5,
                                      ceil_mode=True)),
    ("avg_pool2d", (1, 2, 6, 6), dict(kernel_size=2)),
    ("adaptive_avg_pool2d", (2, 3, 9, 11), dict(output_size=(4, 5))),
    ("adaptive_avg_pool2d", (1, 4, 5, 3), dict(output_size=(7, 8))),
    ("adaptive_avg_pool2d", (2, 3, 10, 10), dict(output_size=(None, 3))),
    ("adaptive_avg_pool2d", (2, 5, 6, 9), dict(output_size=1)),
    ("adaptive_max_pool2d", (2, 3, 9, 11), dict(output_size=(4, 5))),
    ("adaptive_max_pool2d", (1, 4, 5, 3), dict(output_size=(7, 8))),
    ("adaptive_max_pool2d", (2, 3, 10, 10), dict(output_size=(3, None))),
    ("adaptive_max_pool2d", (2, 5, 6, 9), dict(output_size=1)),
    # an input size a multiple of the output's: the CPU forward runs these as strided windows
    ("adaptive_avg_pool2d", (2, 3, 12, 8), dict(output_size=(4, 2))),
    ("adaptive_max_pool2d", (2, 3, 12, 7), dict(output_size=(4, 3))),
]  # fmt: skip


def _case_id(case):
    op, shape, kw = case
    args = "-".join(f"{k}={v}" for k, v in kw.items()).replace(" ", "")
    return f"{op}-{_sid(shape)}-{args}"


def _as_pair(result):
    """(values, indices or None) of a pooling result."""
    return result if isinstance(result, tuple) else (result, None)


def _check_window(target, op, shape, kw, dtype, layout, noncontig=False, batched=True):
    fn, ref_fn = WINDOW_OPS[op]
    if dtype.is_floating_point:
        x = make_input(shape, dtype, target.device, layout=layout, noncontig=noncontig)
    else:  # integers: small values, so that ties happen
        x = torch.randint(-20, 20, shape, device=target.device).to(dtype)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
    if not batched:
        x = x[0]
    out, indices = _as_pair(fn(x, **kw))
    expected, expected_indices = _as_pair(ref_fn(x, **kw))
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.stride() == expected.stride(), f"strides {out.stride()} != {expected.stride()}"
    if indices is not None:
        # A max is exact in any precision, so are its indices: torch's, element for element.
        assert torch.equal(out, expected)
        assert torch.equal(indices, expected_indices)
        assert indices.stride() == expected_indices.stride()
    elif not dtype.is_floating_point:
        assert torch.equal(out, expected)  # int64 avg_pool2d: torch's truncating division
    elif out.numel():
        assert_close_to_ref(out, ref_fn(x.double(), **kw), torch_lowp=expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=_case_id)
def test_window_matches_torch(target, case, layout):
    _check_window(target, *case, torch.float32, layout)


WINDOW_DTYPE_CASES = [WINDOW_CASES[i] for i in (0, 2, 7, 10, 12, 17)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", WINDOW_DTYPE_CASES, ids=_case_id)
def test_window_dtypes(target, case, dtype, layout):
    _check_window(target, *case, dtype, layout)


INTEGER_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
def test_window_integers_where_torch_takes_them(target, dtype, layout):
    # torch's max_pool2d takes every integer dtype, its avg_pool2d int64 alone.
    _check_window(target, *WINDOW_CASES[2], dtype, layout)
    if dtype == torch.int64:
        _check_window(target, *WINDOW_CASES[8], dtype, layout)


@pytest.mark.parametrize("case", [WINDOW_CASES[i] for i in (0, 6, 12, 16)], ids=_case_id)
def test_window_noncontiguous_unbatched_and_empty_batch(target, case):
    op, shape, kw = case
    _check_window(target, op, shape, kw, torch.float32, "nchw", noncontig=True)
    _check_window(target, op, shape, kw, torch.float32, "nhwc", batched=False)
    _check_window(target, op, (0, *shape[1:]), kw, torch.float32, "nchw")
    # a channels_last tensor that is sliced: torch still answers in channels_last
    x = make_input(shape, torch.float32, target.device, layout="nhwc")[:, :, :, ::2]
    fn, ref_fn = WINDOW_OPS[op]
    out, expected = _as_pair(fn(x, **kw))[0], _as_pair(ref_fn(x, **kw))[0]
    assert out.stride() == expected.stride()
    assert_close_to_ref(out, _as_pair(ref_fn(x.double(), **kw))[0])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["max_pool2d", "adaptive_max_pool2d"])
def test_window_max_nan_ties_and_minus_inf(target, op, layout):
    fn, ref_fn = WINDOW_OPS[op]
    x = make_input((2, 3, 9, 9), torch.float32, target.device, layout=layout)
    x[0, 0, 2, 3] = float("nan")
    x[0, 0, 3, 3] = float("nan")  # two NaNs in a window: torch keeps the later index
    x[0, 1] = 1.0  # all ties: the first tap
    x[1, 2] = float("-inf")  # all -inf: the first valid tap
    if op == "max_pool2d":
        kws = [dict(kernel_size=3, stride=2, padding=1)]
    else:  # 9 -> 3: windows of 3 taps 3 apart, as the CPU forward runs them
        kws = [dict(output_size=4), dict(output_size=3)]
    for kw in kws:
        out, indices = fn(x, **kw)
        expected, expected_indices = ref_fn(x, **kw)
        torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_window_wholly_in_the_padding(target, layout):
    # A dilated window can reach over the whole input: in H, taps at rows -1 and 1 of a
    # one-row input. torch gives -inf and the index of the first tap past the padding, here
    # 3, past the 3-element plane. Its gradient is dropped: the output is a constant, and a
    # scatter to that index would write into the next plane (or past the tensor).
    x = make_input((2, 5, 1, 3), torch.float32, target.device, layout=layout, requires_grad=True)
    kw = dict(kernel_size=(2, 5), stride=(2, 1), padding=(1, 1), dilation=(2, 1))
    out, indices = PF.max_pool2d(x, **kw, return_indices=True)
    expected, expected_indices = F.max_pool2d(x.detach().cpu(), **kw, return_indices=True)
    assert torch.equal(out.cpu(), expected) and torch.equal(indices.cpu(), expected_indices)
    assert bool((indices >= 3).all())
    (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert torch.equal(grad, torch.zeros_like(x))


# Forward paths the CPU kernel picks by shape: identity windows (a copy), NCHW outputs under 8
# wide pooled 32 planes at a time (33 planes: a partial block too), row band by row band when
# the planes are tall (200 x 13, 72 x 40), sums over runs of 16 columns (48 -> 3), and NHWC
# bfloat16 sums of windows that overlap along W, by column sums (35 channels: 32 and the rest).
SHAPE_PATH_CASES = [
    ("adaptive_max_pool2d", (3, 11, 7, 7), dict(output_size=7)),
    ("adaptive_avg_pool2d", (3, 11, 7, 7), dict(output_size=7)),
    ("max_pool2d", (1, 33, 9, 9), dict(kernel_size=1)),
    ("max_pool2d", (1, 33, 200, 13), dict(kernel_size=3, stride=2, padding=1)),
    ("max_pool2d", (1, 33, 200, 13), dict(kernel_size=(3, 2), stride=2, padding=1,
                                         dilation=(2, 3), ceil_mode=True)),
    ("adaptive_max_pool2d", (1, 33, 72, 40), dict(output_size=(7, 5))),
    ("avg_pool2d", (1, 33, 200, 13), dict(kernel_size=3, stride=2, padding=1,
                                         count_include_pad=False)),
    ("adaptive_avg_pool2d", (1, 33, 32, 48), dict(output_size=(4, 3))),
    ("adaptive_avg_pool2d", (2, 35, 9, 11), dict(output_size=(4, 5))),
]  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32], ids=str)
@pytest.mark.parametrize("case", SHAPE_PATH_CASES, ids=_case_id)
def test_window_paths_by_shape(target, case, dtype, layout):
    if target.backend == "triton" and target.device == "cpu":
        pytest.skip("CPU and CUDA kernel paths; large for the Triton interpreter")
    if dtype == torch.int32 and case[0] != "max_pool2d":
        pytest.skip("integers: max_pool2d alone takes int32")
    _check_window(target, *case, dtype, layout)


# Gradients


GRAD_CASES = [WINDOW_CASES[i] for i in (0, 2, 3, 7, 8, 10, 13, 16)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_window_gradcheck(target, case, layout):
    op, shape, kw = case
    fn = lambda x: _as_pair(WINDOW_OPS[op][0](x, **kw))[0]  # noqa: E731
    x = make_input(shape, torch.float64, target.device, layout=layout, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_window_grad_matches_torch(target, case, layout):
    op, shape, kw = case
    fn, ref_fn = WINDOW_OPS[op]
    x = make_input(shape, torch.float32, target.device, layout=layout)
    grad, ref_grad = grads_against_torch(
        lambda t: _as_pair(fn(t, **kw))[0], lambda t: _as_pair(ref_fn(t, **kw))[0], x
    )
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert grad.stride() == ref_grad.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [WINDOW_CASES[i] for i in (0, 7, 13)], ids=_case_id)
def test_window_low_precision_grad(target, case, dtype):
    op, shape, kw = case
    fn, ref_fn = WINDOW_OPS[op]
    first = lambda f, t: _as_pair(f(t, **kw))[0]  # noqa: E731
    x = make_input(shape, dtype, target.device, layout="nhwc")
    g = torch.randn_like(first(ref_fn, x))
    grads = []
    for f, t in ((fn, x), (ref_fn, x), (ref_fn, x.double())):  # ours, torch's, float64
        t = t.detach().requires_grad_(True)
        first(f, t).backward(g.to(t.dtype))
        grads.append(t.grad)
    assert_close_to_ref(grads[0], grads[2], torch_lowp=grads[1])


def test_window_backward_is_deterministic(target):
    x = make_input((2, 4, 11, 11), torch.float32, target.device, layout="nhwc")
    grads = []
    for _ in range(2):
        t = x.detach().requires_grad_(True)
        PF.avg_pool2d(t, 3, 1, 1).backward(torch.ones(2, 4, 11, 11, device=target.device))
        grads.append(t.grad)
    assert torch.equal(grads[0], grads[1])


# opcheck and torch.compile


@pytest.mark.parametrize("layout", LAYOUTS)
def test_window_opcheck(target, layout):
    x = make_input((2, 3, 7, 6), torch.float32, target.device, layout=layout)
    cl = layout == "nhwc"
    strided = ([3, 2], [2, 1], [1, 1], [1, 1])
    out, idx = torch.ops.pykern.max_pool2d_fwd(x, *strided[:3], [1, 2], [3, 5], False, cl, True)
    for args in (
        (x, *strided, [4, 6], False, cl, True),
        (x, *strided, [4, 6], False, cl, False),
        (x, [1, 1], [1, 1], [0, 0], [1, 1], [3, 4], True, cl, True),
    ):
        torch.library.opcheck(torch.ops.pykern.max_pool2d_fwd.default, args)
    torch.library.opcheck(
        torch.ops.pykern.max_pool2d_bwd.default,
        (torch.randn_like(out), idx, [7, 6], *strided[:3], [1, 2], False, cl),
    )
    for args in (
        (x, *strided[:3], [4, 6], False, True, 0, cl),
        (x, *strided[:3], [4, 6], False, False, 3, cl),
    ):
        torch.library.opcheck(torch.ops.pykern.avg_pool2d_fwd.default, args)
        grad = torch.randn(2, 3, 4, 6, device=target.device)
        if cl:
            grad = grad.contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(
            torch.ops.pykern.avg_pool2d_bwd.default, (grad, [7, 6], *args[1:4], *args[5:])
        )


@pytest.mark.parametrize("case", [WINDOW_CASES[i] for i in (0, 6, 12, 16)], ids=_case_id)
def test_window_compile_fullgraph(target, case):
    op, shape, kw = case
    fn, ref_fn = WINDOW_OPS[op]
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x: _as_pair(fn(x * 2.0, **kw))[0], fullgraph=True, backend="aot_eager"
    )
    x = make_input(shape, torch.float32, target.device, layout="nhwc", requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, _as_pair(ref_fn(x.detach() * 2.0, **kw))[0])
    out.sum().backward()
    assert x.grad is not None and not x.grad.isnan().any()


# Window modules: torch's subclasses, same arguments, repr and behaviour


WINDOW_MODULES = [
    ("MaxPool2d", dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)),
    ("MaxPool2d", dict(kernel_size=2, return_indices=True)),
    ("AvgPool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                       count_include_pad=False)),
    ("AvgPool2d", dict(kernel_size=2, divisor_override=3)),
    ("AdaptiveAvgPool2d", dict(output_size=(3, None))),
    ("AdaptiveMaxPool2d", dict(output_size=3, return_indices=True)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kw"), WINDOW_MODULES, ids=lambda v: str(v))
def test_window_modules(name, kw):
    ours, theirs = getattr(pykern.nn, name)(**kw), getattr(torch.nn, name)(**kw)
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = make_input((2, 3, 9, 8), torch.float32, layout="nhwc")
    out, expected = _as_pair(ours(x)), _as_pair(theirs(x))
    torch.testing.assert_close(out[0], expected[0])
    if out[1] is not None:
        assert torch.equal(out[1], expected[1])


# Window bad input: each refused with the argument named


WINDOW_BAD_INPUT = [
    (PF.max_pool2d, dict(kernel_size=0), ValueError, "max_pool2d: kernel_size must be greater"),
    (PF.max_pool2d, dict(kernel_size=2, stride=0), ValueError, "max_pool2d: stride must be"),
    (PF.max_pool2d, dict(kernel_size=2, stride=-1), ValueError, "max_pool2d: stride must be"),
    (PF.max_pool2d, dict(kernel_size=2, dilation=0), ValueError, "max_pool2d: dilation must be"),
    (PF.max_pool2d, dict(kernel_size=3, padding=2), ValueError,
     r"max_pool2d: padding \(2\) must be at most half"),
    # torch compares the padding with the kernel, not the dilated kernel
    (PF.max_pool2d, dict(kernel_size=4, padding=3, dilation=2), ValueError,
     r"max_pool2d: padding \(3\) must be at most half of the kernel_size \(4\)"),
    (PF.max_pool2d, dict(kernel_size=2, padding=-1), ValueError,
     "max_pool2d: padding must be non-negative"),
    (PF.max_pool2d, dict(kernel_size=7), ValueError, "max_pool2d: the output would be empty"),
    (PF.max_pool2d, dict(kernel_size=(2, 2, 2)), TypeError, "max_pool2d: kernel_size must be"),
    (PF.max_pool2d, dict(kernel_size=2.5), TypeError, "max_pool2d: kernel_size must be"),
    (PF.avg_pool2d, dict(kernel_size=3, padding=2), ValueError,
     r"avg_pool2d: padding \(2\) must be at most half"),
    (PF.avg_pool2d, dict(kernel_size=2, divisor_override=0), ValueError,
     "avg_pool2d: divisor_override must be non-zero"),
    (PF.avg_pool2d, dict(kernel_size=0), ValueError, "avg_pool2d: kernel_size must be greater"),
    (PF.adaptive_avg_pool2d, dict(output_size=-1), ValueError,
     "adaptive_avg_pool2d: output_size must be >= 0"),
    (PF.adaptive_max_pool2d, dict(output_size=(2, -3)), ValueError,
     "adaptive_max_pool2d: output_size must be >= 0"),
    (PF.adaptive_avg_pool2d, dict(output_size="big"), TypeError,
     "adaptive_avg_pool2d: output_size must be"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fn", "kw", "error", "match"), WINDOW_BAD_INPUT, ids=lambda v: getattr(v, "__name__", None)
)
def test_window_bad_arguments(fn, kw, error, match):
    with pytest.raises(error, match=match):
        fn(torch.randn(1, 2, 5, 5), **kw)


def test_output_format_follows_torch_for_every_stride_order():
    # Which memory format an output takes: torch's rule reads the strides of size-1 dims too,
    # so sizes 1 and 2 in every position, each dim order, and views with gaps.
    import itertools

    from pykern.ops.pooling import suggest_memory_format

    for shape in itertools.product((1, 2), (1, 2, 3), (1, 2), (1, 3)):
        inputs = [torch.randn(2, *shape[1:]).contiguous(memory_format=torch.channels_last)[:1]]
        inputs.append(torch.randn([s + 1 for s in shape])[: shape[0], :, 1:, : shape[3]])
        for perm in itertools.permutations(range(4)):
            x = torch.randn([shape[p] for p in perm]).permute([perm.index(d) for d in range(4)])
            inputs.append(x)
        for x in inputs:
            expected = F.max_pool2d(x, 1)
            channels_last = expected.is_contiguous(memory_format=torch.channels_last)
            if channels_last == expected.is_contiguous():
                continue  # both formats lay it out alike
            want = torch.channels_last if channels_last else torch.contiguous_format
            assert suggest_memory_format(x) == want, (x.shape, x.stride())


def test_window_cache_keeps_argument_types_apart():
    # The validated windows are cached per argument; 3.0 and True hash as 3 and 1 do, so a
    # cached valid window must not answer for them.
    x = torch.randn(1, 2, 5, 5)
    for fn, good, bad, name in (
        (PF.max_pool2d, 3, 3.0, "kernel_size"),
        (PF.max_pool2d, (1, 3), (True, 3), "kernel_size"),
        (PF.avg_pool2d, (3, 1), (3, 1.0), "kernel_size"),
        (PF.adaptive_avg_pool2d, (2, None), (2.0, None), "output_size"),
        (PF.adaptive_max_pool2d, 1, True, "output_size"),
    ):
        fn(x, good)
        with pytest.raises(TypeError, match=f"{fn.__name__}: {name} must be an int"):
            fn(x, bad)


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
                                "adaptive_max_pool2d"])  # fmt: skip
def test_window_bad_input_tensor(op):
    fn = getattr(PF, op)
    first = dict(output_size=2) if op.startswith("adaptive") else dict(kernel_size=2)
    with pytest.raises(TypeError, match=f"{op}: input must be a torch.Tensor"):
        fn([1.0], **first)
    for shape in ((3, 4), (1, 2, 3, 4, 5)):
        with pytest.raises(ValueError, match=f"{op}: input must be 3D .* got a {len(shape)}D"):
            fn(torch.randn(shape), **first)
    with pytest.raises(ValueError, match=f"{op}: input must have non-zero C, H and W"):
        fn(torch.randn(2, 3, 0, 4), **first)
    refused = {
        "max_pool2d": [torch.bool, torch.complex64],
        "avg_pool2d": [torch.int32, torch.uint8, torch.bool],
        "adaptive_avg_pool2d": [torch.int64, torch.int32],
        "adaptive_max_pool2d": [torch.int64, torch.uint8],
    }[op]
    for dtype in refused:
        with pytest.raises(TypeError, match=f"{op}: input must be a"):
            fn(torch.ones(1, 2, 4, 4, dtype=dtype), **first)
