"""Layout family: to_channels_last / to_channels_first / nchw_to_nhwc / nhwc_to_nchw.

Sections, in the order every family's tests follow: values and strides against torch,
gradients, opcheck, torch.compile, bad input. The ops move bytes, so results must be exactly
torch's (torch.equal), for every dtype; outputs are poisoned first (conftest).
"""

import pytest
import torch

import pykern
import pykern.functional as PF
from pykern._ext import _C
from tests.helpers import grads_against_torch, make_input

OPS = {
    # name: (pykern op, torch expression, layout of the input it transforms)
    "to_channels_last": (
        PF.to_channels_last,
        lambda x: x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        ),
        "nchw",
    ),
    "to_channels_first": (PF.to_channels_first, lambda x: x.contiguous(), "nhwc"),
    "nchw_to_nhwc": (
        PF.nchw_to_nhwc,
        lambda x: (
            x.permute(0, 2, 3, 1).contiguous()
            if x.dim() == 4
            else x.permute(0, 2, 3, 4, 1).contiguous()
        ),
        "nchw",
    ),
    "nhwc_to_nchw": (
        PF.nhwc_to_nchw,
        lambda x: (
            x.permute(0, 3, 1, 2).contiguous()
            if x.dim() == 4
            else x.permute(0, 4, 1, 2, 3).contiguous()
        ),
        "nchw",  # its input is a plain contiguous (N, H, W, C) tensor
    ),
}

# Not multiples of any tile (32/64), batch 1, sizes of 1, C=3, zero-size, 5D.
SHAPES = [
    (2, 3, 5, 7),
    (1, 1, 1, 1),
    (3, 33, 9, 31),
    (1, 70, 1, 65),
    (2, 1, 6, 6),
    (4, 5, 1, 1),
    (0, 3, 4, 4),
    (2, 0, 3, 3),
    (2, 3, 4, 5, 6),
    (1, 17, 3, 1, 35),
]
DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
]  # fmt: skip
# dtypes torch has few ops for: random bits in, results compared bit for bit.
BIT_DTYPES = [
    torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64,
    torch.complex32,
]  # fmt: skip
_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _random_bits(shape, dtype, device):
    width = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape, width), dtype=torch.uint8, device=device)
    return raw.view(dtype).squeeze(-1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers: compares NaN payloads and dtypes without == exactly."""
    if t.element_size() == 16:  # complex128
        return torch.view_as_real(t).view(torch.int64)
    return t.view(_SAME_WIDTH_INT[t.element_size()])


def _sid(shape):
    return "x".join(map(str, shape))


def _check_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    assert out.stride() == ref.stride(), f"strides {out.stride()} != torch's {ref.stride()}"
    assert torch.equal(_bits(out), _bits(ref))


# Values and strides


@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("op", list(OPS))
def test_matches_torch(target, op, shape):
    fn, ref_fn, layout = OPS[op]
    x = make_input(shape, torch.float32, target.device, layout=layout)
    _check_same(fn(x), ref_fn(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", list(OPS))
def test_every_dtype(target, op, dtype):
    fn, ref_fn, layout = OPS[op]
    x = make_input((2, 19, 5, 7), dtype, target.device, layout=layout)  # SIMD blocks + edges
    _check_same(fn(x), ref_fn(x))


def _strided_inputs(device):
    base = make_input((3, 6, 10, 12), torch.float32, device)
    return {
        "sliced_w": base[..., ::2],  # last dim not unit-stride
        "sliced_h": base[:, :, ::3, :],  # H and W cannot merge
        "sliced_c": base[:, 1:5],  # storage offset
        "hw_transposed": base.transpose(2, 3),
        "expanded": make_input((1, 6, 1, 12), torch.float32, device).expand(3, 6, 10, 12),
        "nhwc_sliced": make_input((3, 6, 10, 12), torch.float32, device, "nhwc")[:, ::2, 1:, :],
        "batch_step": base[::2],
        "permuted_5d": make_input((2, 3, 4, 5, 6), torch.float32, device).permute(0, 4, 2, 1, 3),
    }


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", BIT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", list(OPS))
def test_every_dtype_bitwise(target, op, dtype):
    fn, ref_fn, _ = OPS[op]
    x = _random_bits((2, 19, 5, 7), dtype, target.device)
    if OPS[op][2] == "nhwc":
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last strides
    _check_same(fn(x), ref_fn(x))


@pytest.mark.parametrize(
    "kind",
    ["sliced_w", "sliced_h", "sliced_c", "hw_transposed", "expanded", "nhwc_sliced",
     "batch_step", "permuted_5d"],
)  # fmt: skip
@pytest.mark.parametrize("op", list(OPS))
def test_any_input_strides(target, op, kind):
    fn, ref_fn, _ = OPS[op]
    x = _strided_inputs(target.device)[kind]
    _check_same(fn(x), ref_fn(x))


@pytest.mark.parametrize("op", list(OPS))
def test_returns_input_when_already_in_layout(target, op):
    """torch's .contiguous() returns self (or the permuted view) when nothing moves; so do we."""
    fn, ref_fn, layout = OPS[op]
    x = make_input((2, 3, 4, 5), torch.float32, target.device, layout=layout)
    already = ref_fn(x)
    out = fn(already) if op.startswith("to_") else None
    if out is not None:
        assert out is already
    else:  # the permute ops: input already laid out in the output order
        back = x.permute(0, 3, 1, 2) if op == "nchw_to_nhwc" else x.permute(0, 2, 3, 1)
        out = fn(back)
        assert out.data_ptr() == back.data_ptr()
        _check_same(out, ref_fn(back))


def test_plan_reduces_nchw_to_nhwc_to_a_batched_transpose():
    """The shared plan (csrc/common/index.h) merges H and W and finds the unit-stride dim."""
    x = torch.empty(4, 8, 5, 6)
    plan = _C.permute_plan(list(x.shape), list(x.stride()), [0, 2, 3, 1])
    assert plan["batch"] == [(4, 8 * 30, 30 * 8)]
    assert (plan["rows"], plan["row_in"], plan["row_out"]) == (30, 1, 8)
    assert (plan["cols"], plan["col_in"]) == (8, 30)
    assert plan["transposed"]
    # already-contiguous: one long row, nothing transposed
    plan = _C.permute_plan([4, 8, 5, 6], list(x.stride()), [0, 1, 2, 3])
    assert plan["batch"] == [] and plan["cols"] == 4 * 8 * 30 and not plan["transposed"]


@pytest.mark.slow
def test_offsets_past_2_to_the_31(target):
    """64-bit indexing: a 2.2 GB uint8 tensor whose offsets pass 2^31."""
    if target.backend == "triton" and target.device == "cpu":
        pytest.skip("too large for the Triton interpreter (about 0.8 s per million elements)")
    n, c, h, w = 1, 2, 1 << 15, (1 << 15) + 8
    try:
        x = torch.randint(0, 255, (n, c, h, w), dtype=torch.uint8, device=target.device)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        pytest.skip(f"cannot allocate the large input: {err}")
    out = PF.nchw_to_nhwc(x)
    assert out.shape == (n, h, w, c)
    assert torch.equal(out[..., 0], x[:, 0]) and torch.equal(out[..., 1], x[:, 1])


# Gradients


@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (1, 2, 2, 1, 3)], ids=_sid)
@pytest.mark.parametrize("op", list(OPS))
def test_gradcheck(target, op, shape):
    # Small shapes and fast mode: every Jacobian column is a kernel launch, and each launch
    # costs about 0.1 s in the Triton interpreter.
    fn, _, layout = OPS[op]
    x = make_input(shape, torch.float64, target.device, layout=layout, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("op", list(OPS))
def test_grad_matches_torch(target, op):
    fn, ref_fn, layout = OPS[op]
    x = make_input((2, 6, 5, 7), torch.float32, target.device, layout=layout)
    grad, ref_grad = grads_against_torch(fn, ref_fn, x)
    assert torch.equal(grad, ref_grad)


# opcheck: schema, fake (meta) implementation and strides, dispatch under every mode


@pytest.mark.parametrize(
    "shape,perm",
    [((2, 3, 4, 5), [0, 2, 3, 1]), ((2, 3, 4, 5), [0, 3, 1, 2]), ((2, 3, 4, 5, 6), [0, 2, 3, 4, 1]),
     ((0, 3, 4, 4), [0, 2, 3, 1])],
)  # fmt: skip
def test_opcheck(target, shape, perm):
    x = make_input(shape, torch.float32, target.device)
    torch.library.opcheck(torch.ops.pykern.permute_copy.default, (x, perm))
    torch.library.opcheck(torch.ops.pykern.permute_copy.default, (x.transpose(1, 2), perm))


def test_fake_tensor_matches_kernel_strides():
    x = torch.empty(2, 3, 4, 5, device="meta")
    out = PF.to_channels_last(x)
    assert out.device.type == "meta"
    assert out.stride() == x.contiguous(memory_format=torch.channels_last).stride()


# torch.compile


@pytest.mark.parametrize("op", list(OPS))
def test_compile_fullgraph(target, op):
    fn, ref_fn, layout = OPS[op]
    torch._dynamo.reset()

    def step(x):
        return fn(x * 2.0) + 1.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = make_input((2, 3, 5, 7), torch.float32, target.device, layout=layout, requires_grad=True)
    out = compiled(x)
    ref = ref_fn(x.detach() * 2.0) + 1.0
    assert torch.equal(out, ref) and out.stride() == ref.stride()
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_compile_inductor(target):
    """The default backend (inductor) too, forward and backward, once."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: PF.to_channels_last(x).sin(), fullgraph=True)
    x = make_input((2, 3, 5, 7), torch.float32, target.device, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, x.detach().sin(), rtol=1e-6, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(x.grad, x.detach().cos(), rtol=1e-6, atol=1e-6)


# Bad input


@pytest.mark.parametrize("op", list(OPS))
def test_bad_input(op):
    fn = OPS[op][0]
    with pytest.raises(TypeError, match=f"{op}: input must be a torch.Tensor, got list"):
        fn([[1.0]])
    with pytest.raises(ValueError, match=f"{op}: input must be 4D .* got a 3D tensor"):
        fn(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=f"{op}: input must be 4D .* got a 6D tensor"):
        fn(torch.randn(1, 2, 3, 4, 5, 6))
    with pytest.raises(ValueError, match=f"{op}: input must be a dense"):
        fn(torch.randn(2, 3, 4, 5).to_sparse())


def test_bad_permutation_is_refused_by_every_backend():
    x = torch.randn(2, 3, 4, 5)
    for perm in ([0, 1, 2], [0, 1, 1, 2], [0, 1, 2, 7]):
        with pytest.raises(ValueError, match="perm"):
            _C.permute_copy_cpu(x, perm)


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be one of auto, cuda, triton; got 'fast'"):
        pykern.set_backend("fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        with pykern.use_backend("cudnn"):
            pass
