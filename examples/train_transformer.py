"""Train a small Transformer (LayerNorm, multi-head attention) on synthetic sequences with
pykern, side by side with the same model on torch.

    python examples/train_transformer.py [--steps 40] [--device cpu|cuda]

The task: count how often token 0 occurs in a sequence (0, 1, 2 or 3+ times), a 4-way
classification. pykern.convert replaces the encoder's LayerNorms and MultiheadAttentions (whose
attention runs in pykern.functional.scaled_dot_product_attention).
1. float64, on CPU: losses of the converted model and torch's agree step by step.
2. float32 on the device (a GPU when present): both train; the loss falls on both.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import pykern
from pykern.models import transformer_encoder


class Classifier(nn.Module):
    """Token and position embeddings, a TransformerEncoder, mean over positions, Linear."""

    def __init__(self, vocab: int, length: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(1, length, d_model))
        self.encoder = transformer_encoder(d_model, heads, layers, 2 * d_model, norm_first=True)
        self.head = nn.Linear(d_model, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(tokens) + self.pos)
        return self.head(x.mean(dim=1))


def make_data(n: int, vocab: int, length: int, generator: torch.Generator):
    tokens = torch.randint(0, vocab, (n, length), generator=generator)
    labels = (tokens == 0).sum(dim=1).clamp(max=3)
    return tokens, labels


def train_side_by_side(models, tokens, labels, steps, batch, lr, device):
    tokens, labels = tokens.to(device), labels.to(device)
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in models]
    losses = [[] for _ in models]
    for step in range(steps):
        i = torch.arange(step * batch, (step + 1) * batch) % len(tokens)
        for model, opt, history in zip(models, opts, losses, strict=True):
            opt.zero_grad()
            loss = F.cross_entropy(model(tokens[i]), labels[i])
            loss.backward()
            opt.step()
            history.append(loss.item())
    return losses


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="float32 training steps")
    p.add_argument("--check-steps", type=int, default=3, help="float64 steps compared")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=12)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    vocab = 6
    tokens, labels = make_data(1024, vocab, args.length, torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    base = Classifier(vocab, args.length, args.d_model, 4, args.layers)
    ours, summary = pykern.convert(base)
    print(summary)

    models64 = [copy.deepcopy(base).double(), copy.deepcopy(ours).double()]
    t64, p64 = train_side_by_side(
        models64, tokens, labels, args.check_steps, args.batch, 1e-3, "cpu"
    )
    print("step  torch (float64)         pykern (float64)        |difference|")
    for step, (a, b) in enumerate(zip(t64, p64, strict=True)):
        print(f"{step:4d}  {a:.17f}  {b:.17f}  {abs(a - b):.1e}")
    max_rel = max(abs(a - b) / abs(a) for a, b in zip(t64, p64, strict=True))

    models32 = [copy.deepcopy(m).to(args.device) for m in (base, ours)]
    t32, p32 = train_side_by_side(
        models32, tokens, labels, args.steps, args.batch, 3e-3, args.device
    )
    for step in range(0, args.steps, max(1, args.steps // 6)):
        print(f"float32 step {step:4d}  torch {t32[step]:.4f}  pykern {p32[step]:.4f}")
    print(f"float32 final       torch {t32[-1]:.4f}  pykern {p32[-1]:.4f}")
    return {"float64_max_rel_diff": max_rel, "torch_losses": t32, "pykern_losses": p32}


if __name__ == "__main__":
    main()
