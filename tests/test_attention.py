"""Attention family: scaled_dot_product_attention (flash-style) and MultiheadAttention.

Sections as in every family: values against a float64 reference (torch's math path on upcast CPU
copies) by DESIGN.md's tolerance rule, gradients (against float64 autograd, and gradcheck),
dropout (the Philox mask, reproducible from torch's generator), the CPU reference's
materialized second opinion, opcheck, torch.compile, the module, bad input. Outputs are
poisoned first (conftest).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pykern.functional as PF
import pykern.nn as PN
from pykern._ext import _C
from pykern.ops import attention as attention_ops
from tests.helpers import assert_close_to_ref, rel_error

LOW = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _bool_mask(L, S, fully_masked_row=None):
    mask = torch.rand(L, S) > 0.3
    mask[:, 0] = True  # every row attends somewhere, except the one chosen below
    if fully_masked_row is not None:
        mask[fully_masked_row] = False
    return mask


# (query shape, key shape, value shape, keyword arguments, mask maker (L, S) -> mask or None)
# Odd sizes everywhere (no multiple of any block size), small enough for Triton's interpreter.
CASES = {
    "plain": ((2, 3, 17, 16), (2, 3, 23, 16), (2, 3, 23, 16), {}, None),
    "causal-L<S": ((1, 2, 13, 32), (1, 2, 29, 32), (1, 2, 29, 32), dict(is_causal=True), None),
    "causal-L>S": ((1, 2, 37, 16), (1, 2, 11, 16), (1, 2, 11, 16), dict(is_causal=True), None),
    "E80-Ev24": ((1, 2, 19, 80), (1, 2, 21, 80), (1, 2, 21, 24), {}, None),
    "E24-scale": ((2, 1, 9, 24), (2, 1, 33, 24), (2, 1, 33, 40), dict(scale=0.37), None),
    "gqa-4-2": ((2, 4, 11, 16), (2, 2, 14, 16), (2, 2, 14, 16), dict(enable_gqa=True), None),
    "mqa-causal": (
        (1, 4, 15, 16), (1, 1, 15, 16), (1, 1, 15, 16), dict(enable_gqa=True, is_causal=True),
        None,
    ),
    "bool-mask": (
        (2, 2, 13, 16), (2, 2, 17, 16), (2, 2, 17, 16), {}, lambda L, S: _bool_mask(L, S, 4),
    ),
    "float-mask-bcast": (
        (2, 3, 9, 16), (2, 3, 12, 16), (2, 3, 12, 16), {},
        lambda L, S: torch.randn(2, 1, L, S).double(),
    ),
    "key-padding": (
        (3, 2, 7, 16), (3, 2, 10, 16), (3, 2, 10, 16), {},
        lambda L, S: torch.arange(S).expand(3, 1, 1, S) < torch.tensor([10, 4, 1]).view(3, 1, 1, 1),
    ),
    # torch runs a 3D query as 4D: a 4D mask of one batch is accepted (a 5D one for 4D is not)
    "mask-extra-dims": (
        (3, 9, 16), (3, 12, 16), (3, 12, 8), {}, lambda L, S: torch.randn(1, 1, L, S).double(),
    ),
    "2d": ((9, 16), (12, 16), (12, 8), {}, None),
    "5d-bcast": ((2, 1, 2, 7, 16), (1, 3, 2, 9, 16), (1, 3, 2, 9, 16), {}, None),
    "L1-S1": ((1, 2, 1, 16), (1, 2, 1, 16), (1, 2, 1, 16), {}, None),
    "long-S": ((1, 1, 5, 16), (1, 1, 150, 16), (1, 1, 150, 16), {}, None),
}  # fmt: skip
DTYPE_CASES = ["plain", "causal-L>S", "E80-Ev24", "gqa-4-2", "bool-mask"]


def _operands(case, dtype, device):
    q_shape, k_shape, v_shape, kwargs, mask_fn = CASES[case]
    q, k, v = (torch.randn(s, dtype=dtype).to(device) for s in (q_shape, k_shape, v_shape))
    kwargs = dict(kwargs)
    if mask_fn is not None:
        mask = mask_fn(q_shape[-2], k_shape[-2])
        kwargs["attn_mask"] = (mask if mask.dtype == torch.bool else mask.to(dtype)).to(device)
    return q, k, v, kwargs


def _double_cpu(kwargs):
    mask = kwargs.get("attn_mask")
    if mask is None or mask.dtype == torch.bool:
        return {**kwargs, "attn_mask": None if mask is None else mask.cpu()}
    return {**kwargs, "attn_mask": mask.cpu().double()}


def torch_sdpa(q, k, v, **kwargs):
    """torch's math path (the plain formula), so every dtype and shape is accepted."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _fwd_bwd(fn, q, k, v, grad_out, kwargs):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(grad_out)
    return out, q.grad, k.grad, v.grad


def _check_against_torch(target, case, dtype):
    q, k, v, kwargs = _operands(case, dtype, target.device)
    out_shape = torch_sdpa(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                           **_double_cpu(kwargs)).shape  # fmt: skip
    grad_out = torch.randn(out_shape, dtype=dtype).to(target.device)
    ours = _fwd_bwd(PF.scaled_dot_product_attention, q, k, v, grad_out, kwargs)
    ref = _fwd_bwd(
        torch_sdpa, *(t.cpu().double() for t in (q, k, v, grad_out)), _double_cpu(kwargs)
    )
    lowp = [None] * 4
    if dtype in LOW:  # torch's own op as a user gets it: the kernel its dispatcher picks (on a
        # GPU flash or memory-efficient, with 16-bit P and dS as ours; its math path upcasts)
        lowp = _fwd_bwd(F.scaled_dot_product_attention, q, k, v, grad_out, kwargs)
    for name, mine, theirs, torch_lowp in zip(
        ("out", "dq", "dk", "dv"), ours, ref, lowp, strict=True
    ):
        assert mine.dtype == dtype, name
        if not theirs.any():  # e.g. dq with a single key: exactly 0; a kernel leaves rounding
            assert mine.abs().max() <= (1e-2 if dtype in LOW else 1e-5), f"{name}: not ~0"
            continue
        try:
            assert_close_to_ref(mine, theirs.to(target.device), torch_lowp)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_float32(target, case):
    _check_against_torch(target, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DTYPE_CASES)
def test_matches_torch_dtypes(target, case, dtype):
    _check_against_torch(target, case, dtype)


def test_fully_masked_rows_give_zeros_and_finite_gradients(target):
    L, S = 6, 9
    q, k, v = (torch.randn(2, 2, n, 16, device=target.device) for n in (L, S, S))
    mask = torch.ones(L, S, dtype=torch.bool, device=target.device)
    mask[2] = False
    additive = torch.zeros(L, S, device=target.device)
    additive[4] = float("-inf")
    for m in (mask, additive):
        grad_out = torch.randn(2, 2, L, 16, device=target.device)
        out, dq, dk, dv = _fwd_bwd(
            PF.scaled_dot_product_attention, q, k, v, grad_out, dict(attn_mask=m)
        )
        row = 2 if m.dtype == torch.bool else 4
        assert torch.equal(out[:, :, row], torch.zeros_like(out[:, :, row]))
        assert torch.equal(dq[:, :, row], torch.zeros_like(dq[:, :, row]))
        for g in (out, dq, dk, dv):
            assert torch.isfinite(g).all()
        ref = torch_sdpa(q.cpu().double(), k.cpu().double(), v.cpu().double(), attn_mask=m.cpu())
        assert rel_error(out.cpu(), ref) < 1e-5


# Dropout: the kept mask is pykern.ops.attention.dropout_keep_mask's (the numpy twin of
# csrc/common/philox.h), seeded by one draw from torch's default generator.


def _reference_with_dropout(q, k, v, keep, p, is_causal=False):
    """softmax(q k^T / sqrt(E)) * keep / (1 - p) @ v, float64, materialized."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if is_causal:
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    return (scores.softmax(-1) * keep / (1 - p)) @ v


def _seed_after(manual_seed: int) -> int:
    torch.manual_seed(manual_seed)
    return int(attention_ops.new_seed(0.5))


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_reference_with_the_same_mask(target, is_causal):
    Z, H, L, S, E, p = 2, 3, 21, 26, 16, 0.3
    q, k, v = (torch.randn(Z, H, n, E, dtype=torch.float64) for n in (L, S, S))
    grad_out = torch.randn(Z, H, L, E, dtype=torch.float64)
    keep = attention_ops.dropout_keep_mask(_seed_after(1234), Z, H, L, S, p)
    ref = _fwd_bwd(
        lambda *a, **kw: _reference_with_dropout(*a, keep, p, is_causal), q, k, v, grad_out, {}
    )
    dtype = torch.float32
    torch.manual_seed(1234)
    ours = _fwd_bwd(
        PF.scaled_dot_product_attention,
        *(t.to(dtype).to(target.device) for t in (q, k, v, grad_out)),
        dict(dropout_p=p, is_causal=is_causal),
    )
    for name, mine, theirs in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        err = rel_error(mine.cpu(), theirs)
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def test_dropout_is_reproducible_and_seeded_by_torch(target):
    q, k, v = (torch.randn(1, 2, 16, 16, device=target.device) for _ in range(3))

    def run(seed):
        torch.manual_seed(seed)
        return PF.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    keep = attention_ops.dropout_keep_mask(_seed_after(7), 1, 2, 16, 16, 0.5)
    assert 0.4 < keep.double().mean().item() < 0.6


def test_dropout_mask_statistics():
    keep = attention_ops.dropout_keep_mask(99, 2, 4, 64, 64, 0.2)
    assert abs(keep.double().mean().item() - 0.8) < 0.01
    assert attention_ops.dropout_keep_mask(99, 1, 1, 8, 8, 0.0).all()


# gradcheck in float64, and the CPU reference's materialized second opinion


@pytest.mark.parametrize("kwargs", [{}, dict(is_causal=True), dict(enable_gqa=True)], ids=str)
def test_gradcheck(target, kwargs):
    if target.device == "cuda" and target.backend == "cuda":
        pytest.skip("the CUDA kernels take float32 and 16-bit types only")  # see test below
    Hk = 1 if kwargs.get("enable_gqa") else 2
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, device=target.device, requires_grad=True)
    k = torch.randn(1, Hk, 7, 8, dtype=torch.float64, device=target.device, requires_grad=True)
    v = torch.randn(1, Hk, 7, 6, dtype=torch.float64, device=target.device, requires_grad=True)
    mask = None if kwargs else torch.rand(5, 7, device=target.device) > 0.3
    # fast mode (random directions) under Triton's interpreter: the full Jacobian would take
    # minutes there; the CPU reference checks the full one.
    torch.autograd.gradcheck(
        lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs),
        (q, k, v),
        fast_mode=target.backend == "triton",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_tiled_matches_materialized(dtype):
    Z, Hq, Hk, L, S, E, Ev = 2, 4, 2, 70, 133, 24, 40
    q = torch.randn(Z, Hq, L, E, dtype=dtype)
    k, v = torch.randn(Z, Hk, S, E, dtype=dtype), torch.randn(Z, Hk, S, Ev, dtype=dtype)
    acc = attention_ops.acc_dtype(dtype)
    bias = torch.randn(1, 1, L, S, dtype=acc).masked_fill(torch.rand(L, S) < 0.2, float("-inf"))
    bias = bias.expand(Z, Hq, L, S)
    for causal, p in ((False, 0.0), (True, 0.0), (False, 0.25)):
        tiled, lse = _C.attention_fwd_cpu(q, k, v, bias, 0.3, causal, p, 5)
        plain = _C.attention_materialized_cpu(q, k, v, bias, 0.3, causal, p, 5)
        assert lse.dtype == acc and lse.shape == (Z, Hq, L)
        tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_error(tiled, plain) < tol, (causal, p)


# opcheck and torch.compile


def test_opcheck(target):
    q = torch.randn(1, 4, 9, 16, device=target.device)
    k, v = torch.randn(1, 2, 11, 16, device=target.device), torch.randn(1, 2, 11, 8)
    v = v.to(target.device)
    bias = torch.zeros(9, 11, device=target.device).expand(1, 4, 9, 11)
    seed = torch.tensor(3, dtype=torch.int64)
    ops = torch.ops.pykern
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, bias, 0.25, False, 0.1, seed))
    out, lse = ops.attention_fwd(q, k, v, None, 0.25, True, 0.0, seed)
    grad = torch.randn_like(out)
    torch.library.opcheck(
        ops.attention_bwd.default, (grad, q, k, v, out, lse, None, 0.25, True, 0.0, seed)
    )


def test_compile_fullgraph(target):
    def block(q, k, v):
        return PF.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum()

    q, k, v = (torch.randn(2, 2, 10, 16, device=target.device, requires_grad=True) for _ in "qkv")
    torch._dynamo.reset()
    torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v).backward()
    refs = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
    torch_sdpa(*refs, is_causal=True).square().sum().backward()
    for mine, ref in zip((q, k, v), refs, strict=True):
        assert_close_to_ref(mine.grad, ref.grad.to(target.device))


# MultiheadAttention: the same state_dict in torch's module and ours, float64.

MHA_CASES = {
    "batch-first": (dict(batch_first=True), {}),
    "seq-first-kpm": ({}, dict(key_padding_mask=True)),
    "bool-attn-mask": (dict(batch_first=True), dict(attn_mask="bool")),
    "float-mask-and-kpm": (dict(batch_first=True), dict(attn_mask="float", key_padding_mask=True)),
    "causal-hint": (dict(batch_first=True), dict(attn_mask="causal", is_causal=True)),
    "kdim-vdim": (dict(batch_first=True, kdim=12, vdim=10), {}),
    "bias-kv-zero-attn": (dict(add_bias_kv=True, add_zero_attn=True), dict(key_padding_mask=True)),
    "no-bias": (dict(bias=False, batch_first=True), {}),
    "per-head-mask": (dict(batch_first=True), dict(attn_mask="3d")),
    "unbatched": (dict(), dict(unbatched=True)),
}  # fmt: skip


def _mha_inputs(ctor, call, device):
    N, L, S, E, H = 3, 7, 9, 16, 4
    kdim, vdim = ctor.get("kdim", E), ctor.get("vdim", E)
    first = ctor.get("batch_first", False)

    def seq(n, d):
        if call.get("unbatched"):
            return torch.randn(n, d, dtype=torch.float64)
        return torch.randn((N, n, d) if first else (n, N, d), dtype=torch.float64)

    kwargs = {}
    if call.get("key_padding_mask"):
        lengths = torch.tensor([S, 5, 2])
        kwargs["key_padding_mask"] = torch.arange(S).expand(N, S) >= lengths[:, None]
    mask = call.get("attn_mask")
    if mask == "bool":
        kwargs["attn_mask"] = (torch.rand(L, S) > 0.7).logical_and(torch.arange(S) > 0)
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(L, S, dtype=torch.float64)
    elif mask == "3d":
        kwargs["attn_mask"] = torch.randn(N * H, L, S, dtype=torch.float64)
    elif mask == "causal":
        kwargs["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(
            L, dtype=torch.float64
        )
        kwargs["is_causal"] = True
    query = seq(L, E)
    key, value = (query, query) if mask == "causal" else (seq(S, kdim), seq(S, vdim))
    move = {k: v.to(device) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    return [t.to(device) for t in (query, key, value)], {**kwargs, **move}, (E, H)


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_matches_torch(target, case):
    ctor, call = MHA_CASES[case]
    (query, key, value), kwargs, (E, H) = _mha_inputs(ctor, call, target.device)
    torch_mha = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, **ctor)
    ours = PN.MultiheadAttention(E, H, dtype=torch.float64, **ctor).to(target.device)
    ours.load_state_dict(torch_mha.state_dict())
    assert list(ours.state_dict()) == list(torch_mha.state_dict())
    inputs = [t.detach().requires_grad_(True) for t in (query, key, value)]
    ref_inputs = [t.detach().cpu().requires_grad_(True) for t in (query, key, value)]
    out, weights = ours(*inputs, need_weights=False, **kwargs)
    cpu_kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    ref, _ = torch_mha(*ref_inputs, need_weights=False, **cpu_kwargs)
    assert weights is None
    assert rel_error(out.cpu(), ref) < 1e-10
    grad = torch.randn_like(ref)
    out.backward(grad.to(target.device))
    ref.backward(grad)
    for mine, theirs in zip(inputs, ref_inputs, strict=True):
        if theirs.grad is not None:
            assert rel_error(mine.grad.cpu(), theirs.grad) < 1e-10
    for (name, p), (_, p_ref) in zip(
        ours.named_parameters(), torch_mha.named_parameters(), strict=True
    ):
        assert rel_error(p.grad.cpu(), p_ref.grad) < 1e-10, name


def test_multihead_attention_need_weights_is_torchs(target):
    torch_mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ours = PN.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(torch_mha.state_dict())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out, weights = ours(x, x, x)
    ref, ref_weights = torch_mha(x, x, x)
    assert weights.shape == (2, 5, 5)
    assert rel_error(out, ref) < 1e-12 and rel_error(weights, ref_weights) < 1e-12


def test_multihead_attention_causal_hint_needs_mask():
    mha = PN.MultiheadAttention(8, 2)
    x = torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, need_weights=False, is_causal=True)


# Empty sequences and bad input


def test_empty_sequences(target):
    q = torch.randn(2, 3, 4, 8, device=target.device, requires_grad=True)
    k = torch.randn(2, 3, 0, 8, device=target.device, requires_grad=True)
    v = torch.randn(2, 3, 0, 5, device=target.device, requires_grad=True)
    out = PF.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 4, 5) and not out.any()
    out.sum().backward()
    assert q.grad is not None and not q.grad.any()
    empty_q = torch.randn(2, 3, 0, 8, device=target.device)
    assert PF.scaled_dot_product_attention(empty_q, k[:, :, :0], v).shape == (2, 3, 0, 5)


def _bad(**overrides):
    args = dict(
        query=torch.randn(2, 4, 5, 8), key=torch.randn(2, 4, 6, 8), value=torch.randn(2, 4, 6, 8)
    )
    args.update(overrides)
    return args


BAD_INPUT = {
    "head dims differ": (_bad(key=torch.randn(2, 4, 6, 7)), ValueError, "key's head dim"),
    "lengths differ": (_bad(value=torch.randn(2, 4, 7, 8)), ValueError, "value's sequence"),
    "1d query": (_bad(query=torch.randn(8)), ValueError, "query must have at least 2"),
    "mask not broadcasting": (
        _bad(attn_mask=torch.ones(3, 6, dtype=torch.bool)), ValueError, "attn_mask",
    ),
    "mask too many dims": (
        _bad(attn_mask=torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)), ValueError, "attn_mask",
    ),
    "mask dtype": (_bad(attn_mask=torch.ones(5, 6, dtype=torch.int64)), TypeError, "attn_mask"),
    "mask float64 for float32": (
        _bad(attn_mask=torch.ones(5, 6, dtype=torch.float64)), TypeError, "attn_mask",
    ),
    "mask and causal": (
        _bad(attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True), ValueError, "is_causal",
    ),
    "gqa not divisible": (
        _bad(key=torch.randn(2, 3, 6, 8), value=torch.randn(2, 3, 6, 8), enable_gqa=True),
        ValueError, "multiple",
    ),
    "heads differ without gqa": (
        _bad(key=torch.randn(2, 2, 6, 8), value=torch.randn(2, 2, 6, 8)), ValueError, "enable_gqa",
    ),
    "dtypes differ": (_bad(key=torch.randn(2, 4, 6, 8, dtype=torch.float64)), TypeError, "key"),
    "integer query": (
        _bad(query=torch.ones(2, 4, 5, 8, dtype=torch.int64)), TypeError, "query must be float",
    ),
    "dropout 1": (_bad(dropout_p=1.0), ValueError, "dropout_p"),
    "dropout negative": (_bad(dropout_p=-0.1), ValueError, "dropout_p"),
    "dropout not a number": (_bad(dropout_p="0.1"), TypeError, "dropout_p"),
    "scale not a number": (_bad(scale="0.1"), TypeError, "scale"),
    "not a tensor": (_bad(value=[1.0, 2.0]), TypeError, "value"),
    "zero head dim": (
        _bad(query=torch.randn(2, 4, 5, 0), key=torch.randn(2, 4, 6, 0)), ValueError, "head dim",
    ),
    "mask requires grad": (
        _bad(attn_mask=torch.zeros(5, 6, requires_grad=True)), ValueError, "attn_mask",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(case):
    kwargs, error, match = BAD_INPUT[case]
    with pytest.raises(error, match=match):
        PF.scaled_dot_product_attention(**kwargs)


def test_devices_differ():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with pytest.raises(ValueError, match="key is on"):
        PF.scaled_dot_product_attention(**_bad(key=torch.randn(2, 4, 6, 8, device="cuda")))


def test_kernels_check_their_arguments():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8)
    with pytest.raises(ValueError, match="attention_fwd_cpu"):
        _C.attention_fwd_cpu(q, k, v, None, 1.0, False, 0.0, 0)
    with contextlib.suppress(ImportError):
        from pykern.triton_kernels import attention as triton_attention

        with pytest.raises(ValueError, match="attention_fwd"):
            triton_attention.attention_fwd(q, k, v, None, 1.0, False, 0.0, 0)
