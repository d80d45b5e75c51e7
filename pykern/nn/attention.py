"""MultiheadAttention: torch.nn.MultiheadAttention whose need_weights=False path runs pykern's
flash attention. It subclasses torch's module and overrides forward only, so constructor
arguments, parameters (in_proj_weight or q/k/v_proj_weight, in_proj_bias, bias_k, bias_v,
out_proj) and state_dict keys are torch's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pykern import functional as PF


def _additive(mask: torch.Tensor | None, name: str, dtype: torch.dtype):
    """An nn.MultiheadAttention mask as an additive float mask: bool True means "do not attend"
    there (the opposite of scaled_dot_product_attention's bool masks)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    if not mask.is_floating_point():
        raise TypeError(f"MultiheadAttention: {name} must be bool or floating, got {mask.dtype}")
    return mask.to(dtype)


def _pad_key_column(mask: torch.Tensor | None) -> torch.Tensor | None:
    """One more key (bias_k or a zero-attention key) that every query may attend to."""
    return None if mask is None else F.pad(mask, (0, 1))


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention; with need_weights=False (what nn.Transformer* layers ask)
    the attention runs in pykern.functional.scaled_dot_product_attention. When the weights are
    asked for they are an (L, S) matrix by definition, so torch's own path computes them."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if need_weights:
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )  # fmt: skip
        if query.dim() not in (2, 3):
            raise ValueError(
                f"MultiheadAttention: query must be 2D (L, E) or 3D, got {query.dim()}D"
            )
        if is_causal and attn_mask is None:
            raise ValueError(
                "MultiheadAttention: is_causal=True is a hint that attn_mask is the causal "
                "mask, so attn_mask must be given too (as torch requires)"
            )
        unbatched = query.dim() == 2
        if unbatched:  # one sequence: a batch of one, dim 1 in (L, N, E)
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # (N, L, E) -> (L, N, E), torch's internal order
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal)
        if unbatched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """(L, N, E) query, (S, N, kdim) key, (S, N, vdim) value -> (L, N, E)."""
        L, N, E = query.shape
        if E != self.embed_dim:
            raise ValueError(
                f"MultiheadAttention: query's embedding dim is {E}, expected {self.embed_dim}"
            )
        H, head_dim = self.num_heads, self.head_dim
        q, k, v = self._in_projection(query, key, value)
        attn_mask = _additive(attn_mask, "attn_mask", q.dtype)
        key_padding_mask = _additive(key_padding_mask, "key_padding_mask", q.dtype)
        # torch drops the causal hint when a padding mask must be merged in; attn_mask holds it.
        causal = is_causal and key_padding_mask is None
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(1, N, E)])
            v = torch.cat([v, self.bias_v.expand(1, N, E)])
            attn_mask = _pad_key_column(attn_mask)
            key_padding_mask = _pad_key_column(key_padding_mask)
        # (seq, N, E) -> (N, H, seq, head_dim)
        q, k, v = (t.reshape(t.shape[0], N, H, head_dim).permute(1, 2, 0, 3) for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((N, H, 1, head_dim))], dim=2)
            v = torch.cat([v, v.new_zeros((N, H, 1, head_dim))], dim=2)
            attn_mask = _pad_key_column(attn_mask)
            key_padding_mask = _pad_key_column(key_padding_mask)
        S = k.shape[2]
        mask = None
        if attn_mask is not None:  # (L, S) or (N * H, L, S)
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(N, H, L, S)
        if key_padding_mask is not None:  # (N, S)
            padding = key_padding_mask.reshape(N, 1, 1, S)
            mask = padding if mask is None else mask + padding
        dropout_p = self.dropout if self.training else 0.0
        out = PF.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal else mask, dropout_p=dropout_p, is_causal=causal
        )
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)

    def _in_projection(self, query, key, value):
        E = self.embed_dim
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(E)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(E)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
