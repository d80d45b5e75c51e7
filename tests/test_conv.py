"""Convolution family: conv2d (strided, padded incl. 'same', dilated, grouped, depthwise) and
conv_transpose2d (output_padding, groups, dilation), forward and backward, NCHW and NHWC.

Sections as in every family: values and strides against a float64 reference (torch's op on
upcast CPU copies) by DESIGN.md's tolerance rule, gradients (against float64 autograd, and
gradcheck), the im2col workspace bound, opcheck, torch.compile, modules, bad input. Outputs are
poisoned first (conftest).
"""

import pytest
import torch
import torch.nn.functional as F

import pykern.functional as PF
import pykern.nn as PN
from pykern.ops import conv as conv_ops
from tests.helpers import assert_close_to_ref, make_input

# torch's own conv2d warns that an even kernel with padding='same' pads a copy (so does ours)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

LOW = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "nhwc"]

# (input shape, weight shape, keyword arguments): odd sizes, every argument, small enough for
# Triton's interpreter.
CONV_CASES = [
    ((2, 4, 9, 7), (6, 4, 3, 3), dict(padding=1)),
    ((1, 3, 8, 8), (5, 3, 1, 1), dict()),
    ((3, 6, 11, 10), (4, 6, 3, 2), dict(stride=2, padding=(1, 0))),
    ((2, 4, 9, 9), (4, 4, 3, 3), dict(stride=(3, 2), padding=2, dilation=2)),
    ((2, 6, 10, 9), (6, 3, 3, 3), dict(padding=1, groups=2)),
    ((2, 5, 8, 9), (5, 1, 3, 3), dict(stride=2, padding=1, groups=5)),  # depthwise
    ((1, 4, 12, 12), (3, 4, 3, 3), dict(padding=4, dilation=4)),  # atrous
    ((2, 3, 7, 8), (4, 3, 4, 2), dict(padding="same")),  # even kernel: asymmetric padding
    ((2, 3, 7, 8), (4, 3, 3, 3), dict(padding="same", dilation=(2, 1))),
    ((2, 3, 7, 8), (4, 3, 3, 5), dict(padding="valid")),
    ((2, 4, 9, 7), (6, 4, 7, 7), dict(stride=2, padding=3)),  # the ResNet stem's shape
]
TRANSPOSE_CASES = [
    ((2, 4, 5, 6), (4, 3, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ((1, 6, 4, 4), (6, 2, 4, 4), dict(stride=2, padding=1, groups=3)),  # DCGAN-style
    ((2, 3, 5, 4), (3, 4, 3, 2), dict(stride=(1, 2), dilation=2, output_padding=(1, 1))),
    ((2, 4, 6, 5), (4, 2, 3, 3), dict(stride=3, padding=2, output_padding=(2, 0))),
    ((1, 2, 3, 3), (2, 3, 1, 1), dict()),
    # output_padding >= stride (below the dilation) with padding: the rows past the nominal
    # end hold window sums; in W the windows alone would give an empty output
    (
        (2, 3, 5, 4),
        (3, 4, 3, 2),
        dict(stride=(1, 2), padding=1, dilation=(2, 3), output_padding=(1, 2)),
    ),
    ((1, 2, 3, 2), (2, 3, 3, 1), dict(padding=(0, 1), dilation=2, output_padding=(0, 1))),
]
# Depthwise (groups == C, multiplier K / C): the CPU's direct kernels, not im2col. Rows of 37
# and 19 columns reach the 4- and 2-vector blocks and their overlapping last block.
DEPTHWISE_CASES = [
    ((2, 4, 9, 7), (8, 1, 3, 3), dict(padding=1, groups=4)),  # multiplier 2
    ((2, 4, 11, 10), (4, 1, 3, 3), dict(stride=2, padding=2, dilation=2, groups=4)),
    ((1, 6, 11, 10), (6, 1, 5, 4), dict(padding="same", groups=6)),
    ((2, 3, 7, 19), (6, 1, 3, 3), dict(stride=(2, 1), padding=(0, 1), dilation=(2, 1), groups=3)),
    ((1, 2, 5, 37), (2, 1, 3, 3), dict(padding=1, groups=2)),
    # NHWC weight gradient: 20 channels are a full 16-lane block and a partial one; 5 taps a
    # row are a pass of 4 and a pass of 1
    ((2, 20, 9, 13), (20, 1, 3, 3), dict(padding=1, groups=20)),
    ((1, 16, 10, 11), (16, 1, 5, 5), dict(stride=2, padding=2, groups=16)),
]
# Depthwise conv_transpose2d: weight (C, m, R, S) with groups == C (the ops see Kg == 1).
DEPTHWISE_TRANSPOSE_CASES = [
    ((2, 4, 5, 6), (4, 1, 3, 3), dict(stride=2, padding=1, output_padding=1, groups=4)),
    ((2, 3, 5, 17), (3, 2, 3, 3), dict(padding=1, dilation=(1, 2), groups=3)),
]


def _sid(shape):
    return "x".join(map(str, shape))


def _case_id(case):
    x_shape, w_shape, kw = case
    args = "-".join(f"{k}={v}" for k, v in kw.items()).replace(" ", "")
    return f"{_sid(x_shape)}-w{_sid(w_shape)}" + (f"-{args}" if args else "")


def _operands(case, dtype, device, layout, bias=True, transpose=False):
    x_shape, w_shape, kw = case
    x = make_input(x_shape, dtype, device, layout=layout)
    w = make_input(w_shape, dtype, device, layout=layout)
    out_channels = w_shape[1] * kw.get("groups", 1) if transpose else w_shape[0]
    b = make_input((out_channels,), dtype, device) if bias else None
    return x, w, b


def _torch_cpu(fn, *tensors, **kw):
    """torch's op on CPU copies with the same strides, its result moved back: the reference
    on every target (the GPU's cuDNN uses TF32 and its own algorithms)."""
    device = next(t.device for t in tensors if t is not None)
    copies = []
    for t in tensors:
        if t is None:
            copies.append(None)
            continue
        c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)
        copies.append(c)
    out = fn(*copies, **kw)
    return out.to(device)


def _op(transpose):
    return (PF.conv_transpose2d, F.conv_transpose2d) if transpose else (PF.conv2d, F.conv2d)


def _check_forward(target, case, dtype, layout, bias=True, transpose=False):
    ours_fn, torch_fn = _op(transpose)
    x, w, b = _operands(case, dtype, target.device, layout, bias, transpose)
    kw = case[2]
    out = ours_fn(x, w, b, **kw)
    ref = _torch_cpu(torch_fn, *[None if t is None else t.double() for t in (x, w, b)], **kw)
    expected = _torch_cpu(torch_fn, x, w, b, **kw) if dtype in LOW else None
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_to_ref(out, ref, torch_lowp=expected)
    # torch's memory format rule: channels_last output when input or weight is channels_last
    expected_format = _torch_cpu(torch_fn, x.float(), w.float(), None, **kw)
    long_dims = [d for d in range(out.dim()) if out.shape[d] > 1]
    assert [out.stride(d) for d in long_dims] == [expected_format.stride(d) for d in long_dims]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv2d_matches_torch(target, case, layout):
    _check_forward(target, case, torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=_case_id)
def test_conv_transpose2d_matches_torch(target, case, layout):
    _check_forward(target, case, torch.float32, layout, transpose=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv2d_dtypes(target, dtype, layout):
    _check_forward(target, CONV_CASES[4], dtype, layout)
    _check_forward(target, CONV_CASES[0], dtype, layout, bias=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_transpose2d_dtypes(target, dtype):
    _check_forward(target, TRANSPOSE_CASES[0], dtype, "nhwc", transpose=True)
    _check_forward(target, TRANSPOSE_CASES[1], dtype, "nchw", bias=False, transpose=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_under_tf32(target, layout):
    """With torch.backends.cuda.matmul.allow_tf32 the Triton GEMMs take float32 operands as
    TF32 (10-bit mantissas) on a GPU: the forward and both gradients stay within TF32's error
    (about 5e-4 a product, under 2e-3 over these sums) of float64. Elsewhere it changes
    nothing, and the same bound holds with room to spare."""
    x = make_input((2, 16, 9, 9), torch.float32, target.device, layout=layout)
    w = make_input((8, 16, 3, 3), torch.float32, target.device, layout=layout)
    dy = make_input((2, 8, 9, 9), torch.float32, target.device, layout=layout)
    x64, w64 = (t.detach().cpu().double().requires_grad_(True) for t in (x, w))
    ref = F.conv2d(x64, w64, padding=1)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x64, w64), dy.cpu().double())
    x, w = x.requires_grad_(True), w.requires_grad_(True)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out = PF.conv2d(x, w, padding=1)
        dx, dw = torch.autograd.grad(out, (x, w), dy)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    for name, mine, theirs in (("out", out, ref), ("dx", dx, ref_dx), ("dw", dw, ref_dw)):
        try:
            assert_close_to_ref(mine.detach(), theirs.to(target.device), fp32_tol=2e-3)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


def test_mixed_layouts_follow_torch(target):
    # NCHW input with a channels_last weight (and the reverse): torch answers channels_last
    x = make_input((2, 4, 7, 6), torch.float32, target.device, layout="nchw")
    w = make_input((5, 4, 3, 3), torch.float32, target.device, layout="nhwc")
    for a, b in ((x, w), (x.contiguous(memory_format=torch.channels_last), w.contiguous())):
        out = PF.conv2d(a, b, padding=1)
        ref = _torch_cpu(F.conv2d, a.double(), b.double(), padding=1)
        assert_close_to_ref(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_noncontiguous_and_unbatched(target):
    x = make_input((2, 4, 9, 7), torch.float32, target.device, noncontig=True)
    w = make_input((3, 4, 3, 3), torch.float32, target.device)
    out = PF.conv2d(x, w, stride=2, padding=1)
    assert_close_to_ref(out, _torch_cpu(F.conv2d, x.double(), w.double(), stride=2, padding=1))
    out = PF.conv2d(x[0], w, padding=1)
    assert_close_to_ref(out, _torch_cpu(F.conv2d, x[0].double(), w.double(), padding=1))
    wt = make_input((4, 2, 3, 3), torch.float32, target.device)
    out = PF.conv_transpose2d(x[1], wt, stride=2)
    assert_close_to_ref(out, _torch_cpu(F.conv_transpose2d, x[1].double(), wt.double(), stride=2))


@pytest.mark.parametrize("transpose", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_empty_batch(target, transpose):
    case = TRANSPOSE_CASES[0] if transpose else CONV_CASES[2]
    ours_fn, torch_fn = _op(transpose)
    x, w, b = _operands(case, torch.float32, target.device, "nhwc", transpose=transpose)
    x = x[:0].detach().requires_grad_(True)
    w.requires_grad_(True)
    out = ours_fn(x, w, b, **case[2])
    assert out.shape == torch_fn(x.detach().cpu(), w.detach().cpu(), None, **case[2]).shape
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


# Gradients


def _grads(fn, inputs, grad_out=None):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    out.backward(grad_out.to(out.dtype))
    return [None if t is None else t.grad for t in leaves], grad_out


def _check_grads(target, case, dtype, layout, transpose=False):
    ours_fn, torch_fn = _op(transpose)
    kw = case[2]
    inputs = _operands(case, dtype, target.device, layout, transpose=transpose)
    ours, g = _grads(lambda *t: ours_fn(*t, **kw), inputs)
    cpu = [None if t is None else t.detach().cpu() for t in inputs]
    ref, _ = _grads(lambda *t: torch_fn(*t, **kw), [t.double() for t in cpu], g.cpu().double())
    low = None
    if dtype in LOW:
        low, _ = _grads(lambda *t: torch_fn(*t, **kw), cpu, g.cpu())
    for i, name in enumerate(("input", "weight", "bias")):
        expected = None if low is None else low[i].to(target.device)
        try:
            assert_close_to_ref(ours[i], ref[i].to(target.device), torch_lowp=expected)
        except AssertionError as err:
            raise AssertionError(f"grad of {name}: {err}") from None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv2d_grads(target, case, layout):
    _check_grads(target, case, torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=_case_id)
def test_conv_transpose2d_grads(target, case, layout):
    _check_grads(target, case, torch.float32, layout, transpose=True)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_grads(target, dtype):
    _check_grads(target, CONV_CASES[4], dtype, "nhwc")
    _check_grads(target, TRANSPOSE_CASES[0], dtype, "nchw", transpose=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(target, layout):
    fast = target.backend == "triton"  # the interpreter is slow: one random direction
    x = make_input((1, 4, 5, 6), torch.float64, target.device, layout=layout, requires_grad=True)
    w = make_input((4, 2, 3, 2), torch.float64, target.device, layout=layout, requires_grad=True)
    b = make_input((4,), torch.float64, target.device, requires_grad=True)
    conv = lambda x, w, b: PF.conv2d(x, w, b, stride=2, padding=1, dilation=(1, 2), groups=2)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, w, b), fast_mode=fast)
    transpose = lambda x, w, b: PF.conv_transpose2d(  # noqa: E731
        x, w, b, stride=2, padding=1, output_padding=1, groups=2
    )
    assert torch.autograd.gradcheck(transpose, (x, w, b), fast_mode=fast)


def _skip_interpreted(target, keep=False):
    """The depthwise tests are aimed at the CPU's direct kernels: Triton's interpreter (seconds
    per case) runs only the kept ones."""
    if target.backend == "triton" and target.device == "cpu" and not keep:
        pytest.skip("interpreted Triton: only the first depthwise cases")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=_case_id)
def test_depthwise_conv2d(target, case, layout):
    _skip_interpreted(target, keep=case is DEPTHWISE_CASES[0] and layout == "nchw")
    _check_forward(target, case, torch.float32, layout)
    _check_grads(target, case, torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DEPTHWISE_TRANSPOSE_CASES, ids=_case_id)
def test_depthwise_conv_transpose2d(target, case, layout):
    _skip_interpreted(target, keep=case is DEPTHWISE_TRANSPOSE_CASES[0] and layout == "nhwc")
    _check_forward(target, case, torch.float32, layout, transpose=True)
    _check_grads(target, case, torch.float32, layout, transpose=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_depthwise_bfloat16(target, layout):
    _skip_interpreted(target)
    _check_forward(target, DEPTHWISE_CASES[4], torch.bfloat16, layout)
    _check_grads(target, DEPTHWISE_CASES[0], torch.bfloat16, layout)
    _check_grads(target, DEPTHWISE_TRANSPOSE_CASES[1], torch.bfloat16, layout, transpose=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_depthwise_gradcheck(target, layout):
    _skip_interpreted(target)
    x = make_input((1, 2, 5, 6), torch.float64, target.device, layout=layout, requires_grad=True)
    w = make_input((4, 1, 3, 2), torch.float64, target.device, layout=layout, requires_grad=True)
    b = make_input((4,), torch.float64, target.device, requires_grad=True)
    conv = lambda x, w, b: PF.conv2d(x, w, b, stride=(1, 2), padding=1, dilation=2, groups=2)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, w, b))
    wt = make_input((2, 2, 3, 3), torch.float64, target.device, layout=layout, requires_grad=True)
    transpose = lambda x, w, b: PF.conv_transpose2d(x, w, b, padding=1, groups=2)  # noqa: E731
    assert torch.autograd.gradcheck(transpose, (x, wt, b))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_workspace_bound_gives_the_same_result(target, layout):
    # A bound below one image's columns: one image per chunk; results must not change.
    x, w, b = _operands(CONV_CASES[0], torch.float64, target.device, layout)
    x = torch.cat([x, x * 0.5, -x])
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    before = conv_ops.get_workspace_bytes()
    try:
        conv_ops.set_workspace_bytes(1)
        small = PF.conv2d(x, w, b, padding=1)
        (small_grads, g) = _grads(lambda *t: PF.conv2d(*t, padding=1), (x, w, b))
    finally:
        conv_ops.set_workspace_bytes(before)
    torch.testing.assert_close(small, PF.conv2d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)
    big_grads, _ = _grads(lambda *t: PF.conv2d(*t, padding=1), (x, w, b), g)
    for a, c in zip(small_grads, big_grads, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="nbytes must be a positive int"):
        conv_ops.set_workspace_bytes(0)


# opcheck and torch.compile


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(target, layout):
    cl = layout == "nhwc"
    x = make_input((2, 4, 7, 6), torch.float32, target.device, layout=layout)
    w = make_input((6, 2, 3, 3), torch.float32, target.device, layout=layout)
    b = make_input((6,), torch.float32, target.device)
    gy = make_input((2, 6, 4, 3), torch.float32, target.device, layout=layout)
    geo = ([2, 2], [1, 1], [1, 1], 2, cl, 1 << 20)
    ops = torch.ops.pykern
    torch.library.opcheck(ops.conv2d_fwd.default, (x, w, b, *geo))
    torch.library.opcheck(ops.conv2d_bwd_input.default, (gy, w, None, [7, 6], *geo))
    torch.library.opcheck(ops.conv2d_bwd_weight.default, (gy, x, [3, 3], *geo))


def test_compile_fullgraph(target):
    model = torch.nn.Sequential(
        PN.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), PN.ConvTranspose2d(8, 4, 2, stride=2)
    ).to(target.device)
    x = make_input((2, 3, 6, 5), torch.float32, target.device, layout="nhwc", requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    ref_model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.ConvTranspose2d(8, 4, 2, 2)
    ).double()
    ref_model.load_state_dict(model.state_dict())
    x_ref = x.detach().cpu().double().requires_grad_(True)
    ref_model(x_ref).sum().backward()
    assert_close_to_ref(out, ref_model(x_ref.detach()).to(target.device))
    assert_close_to_ref(x.grad, x_ref.grad.to(target.device))


# Modules


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_module_matches_torch(target, padding_mode):
    kw = dict(stride=2, padding=(2, 1), dilation=(1, 2), groups=2, padding_mode=padding_mode)
    ours = PN.Conv2d(4, 6, (3, 2), **kw).to(target.device)
    ref = torch.nn.Conv2d(4, 6, (3, 2), **kw).double()
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()) and repr(ours) == repr(ref)
    x = make_input((2, 4, 9, 8), torch.float32, target.device, layout="nhwc")
    assert_close_to_ref(ours(x), ref(x.cpu().double()).to(target.device))


def test_conv_transpose2d_module_output_size(target):
    ours = PN.ConvTranspose2d(4, 3, 3, stride=2, padding=1).to(target.device)
    ref = torch.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1).double()
    ref.load_state_dict(ours.state_dict())
    x = make_input((2, 4, 5, 6), torch.float32, target.device)
    for size in (None, [9, 11], [10, 12]):
        expected = ref(x.cpu().double(), output_size=size).to(target.device)
        assert_close_to_ref(ours(x, output_size=size), expected)


# Bad input

_X = (2, 4, 7, 7)
BAD_CONV = [
    (dict(weight=(6, 3, 3, 3)), ValueError, "input has 4 channels but weight expects 3"),
    (dict(weight=(5, 2, 3, 3), groups=2), ValueError, r"groups \(2\) must divide weight.shape"),
    (dict(weight=(6, 4, 3, 3), groups=0), ValueError, "groups must be greater than zero"),
    (dict(weight=(6, 4, 3, 3), stride=0), ValueError, "stride must be greater than zero"),
    (dict(weight=(6, 4, 3, 3), dilation=(1, -1)), ValueError, "dilation must be greater"),
    (dict(weight=(6, 4, 3, 3), padding=-1), ValueError, "padding must be non-negative"),
    (dict(weight=(6, 4, 3, 3), padding="full"), ValueError, "padding must be 'same', 'valid'"),
    (dict(weight=(6, 4, 3, 3), padding="same", stride=2), ValueError, "'same' needs stride 1"),
    (dict(weight=(6, 4, 9, 3)), ValueError, "more than the padded input"),
    (dict(weight=(6, 4, 3, 3), bias=(5,)), ValueError, r"bias must have shape \(6,\)"),
    (dict(weight=(6, 4, 3)), ValueError, "weight must be a non-empty 4D tensor"),
    (dict(weight=(6, 4, 3, 3), stride=1.5), TypeError, "stride must be an int or a pair"),
]


@pytest.mark.parametrize("kw,err,msg", BAD_CONV, ids=lambda v: str(v)[:40])
def test_conv2d_bad_input(kw, err, msg):
    kw = dict(kw)
    w = torch.randn(kw.pop("weight"))
    b = torch.randn(kw.pop("bias")) if "bias" in kw else None
    with pytest.raises(err, match=msg):
        PF.conv2d(torch.randn(_X), w, b, **kw)


def test_conv_bad_tensors():
    x, w = torch.randn(_X), torch.randn(6, 4, 3, 3)
    with pytest.raises(TypeError, match="conv2d: input must be float16"):
        PF.conv2d(x.long(), w.long())
    with pytest.raises(TypeError, match="conv2d: weight has dtype torch.float64"):
        PF.conv2d(x, w.double())
    with pytest.raises(TypeError, match="conv2d: bias has dtype"):
        PF.conv2d(x, w, torch.randn(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="conv2d: input must be 3D"):
        PF.conv2d(x[None], w)
    with pytest.raises(TypeError, match="conv2d: weight must be a torch.Tensor"):
        PF.conv2d(x, [1.0])
    with pytest.raises(ValueError, match="conv2d: input must have non-zero C, H and W"):
        PF.conv2d(torch.randn(2, 4, 0, 7), w)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="conv2d: weight is on"):
            PF.conv2d(x, w.cuda())


def test_conv_transpose2d_bad_input():
    x, w = torch.randn(_X), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="output_padding must be smaller than the stride"):
        PF.conv_transpose2d(x, w, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="input has 4 channels but weight.shape"):
        PF.conv_transpose2d(x, torch.randn(3, 3, 3, 3))
    with pytest.raises(ValueError, match=r"groups \(3\) must divide the input channels"):
        PF.conv_transpose2d(x, w, groups=3)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        PF.conv_transpose2d(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="the output would be empty"):
        PF.conv_transpose2d(torch.randn(1, 4, 1, 1), torch.randn(4, 3, 1, 1), padding=1)
    with pytest.raises(TypeError, match="padding must be an int or a pair"):
        PF.conv_transpose2d(x, w, padding="same")
