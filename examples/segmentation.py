"""A dilated-convolution segmentation network (DeepLab-like: atrous convolutions, an ASPP head)
on pykern: forward and backward against the same model on torch, then training on synthetic
masks.

    python examples/segmentation.py [--steps 30] [--device cpu|cuda]

1. float64, on CPU: the converted model's logits, the input gradient and every parameter
   gradient agree with torch's, NCHW and channels_last.
2. float32 on the device (a GPU when present), channels_last: per-pixel cross entropy on images
   of random discs (class 1) and squares (class 2) on noise (class 0); the loss falls.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import pykern
from pykern.models import segmentation_net


def make_data(n: int, size: int, generator: torch.Generator):
    """Images with one disc and one square of random place and size, and their masks."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = 0.3 * torch.randn(n, 3, size, size, generator=generator)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        cy, cx, r = torch.randint(size // 4, 3 * size // 4, (3,), generator=generator).tolist()
        masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= (r // 2 + 2) ** 2] = 1
        y0, x0 = torch.randint(0, size - 5, (2,), generator=generator).tolist()
        masks[i, y0 : y0 + 5, x0 : x0 + 5] = 2
    colors = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [-1.0, 1.0, 0.5]])
    images += colors[masks].permute(0, 3, 1, 2)
    return images, masks


def check(model, images, masks, channels_last: bool) -> float:
    """Largest relative difference pykern vs torch in float64 (train mode, one backward)."""
    ref = copy.deepcopy(model).double()
    x = images.double()
    if channels_last:
        ref, x = (
            ref.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    ours, _ = pykern.convert(ref)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_ref, loss = F.cross_entropy(ref(x_ref), masks), F.cross_entropy(ours(x_ours), masks)
    loss_ref.backward()
    loss.backward()
    flat = lambda ps: torch.cat([q.grad.flatten() for q in ps.parameters()])  # noqa: E731
    pairs = [(loss, loss_ref), (x_ours.grad, x_ref.grad), (flat(ours), flat(ref))]
    return max(((a - b).norm() / b.norm()).item() for a, b in pairs)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=24)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    images, masks = make_data(64, args.size, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    base = segmentation_net(num_classes=3, width=args.width)

    diffs = {layout: check(base, images[:2], masks[:2], layout == "channels_last")
             for layout in ("nchw", "channels_last")}  # fmt: skip
    for layout, d in diffs.items():
        print(
            f"float64 forward+backward ({layout}), pykern vs torch: max relative difference {d:.1e}"
        )

    model, summary = pykern.convert(base)
    print(summary)
    model = model.to(args.device, memory_format=torch.channels_last)
    x_all = images.to(args.device).contiguous(memory_format=torch.channels_last)
    y_all = masks.to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(args.steps):
        i = torch.arange(step * args.batch, (step + 1) * args.batch) % len(images)
        opt.zero_grad()
        loss = F.cross_entropy(model(x_all[i]), y_all[i])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    return {"float64_max_rel_diff": max(diffs.values()), "losses": losses}


if __name__ == "__main__":
    main()
