"""Train a small ResNet-style CNN (conv, BatchNorm, pooling, channels_last) on synthetic images
with pykern, side by side with the same model on torch.

    python examples/train_resnet.py [--steps 40] [--device cpu|cuda]

1. float64, on CPU (pykern's C++ reference kernels): the converted model and torch's start from
   the same weights and see the same batches; their losses agree step by step.
2. float32 on the device (a GPU when present): both train; the loss falls on both.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import pykern
from pykern.models import resnet_small


def make_data(n: int, classes: int, size: int, generator: torch.Generator):
    """Images of `classes` fixed random patterns plus noise; the label is the pattern."""
    patterns = torch.randn(classes, 3, size, size, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    images = patterns[labels] + 0.8 * torch.randn(n, 3, size, size, generator=generator)
    return images, labels


def train_side_by_side(models, images, labels, steps, batch, lr, device, dtype):
    """Trains each model (same batches, SGD with momentum); returns the losses per model."""
    images = images.to(device, dtype).contiguous(memory_format=torch.channels_last)
    labels = labels.to(device)
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in models]
    losses = [[] for _ in models]
    for step in range(steps):
        i = torch.arange(step * batch, (step + 1) * batch) % len(images)
        for model, opt, history in zip(models, opts, losses, strict=True):
            opt.zero_grad()
            loss = F.cross_entropy(model(images[i]), labels[i])
            loss.backward()
            opt.step()
            history.append(loss.item())
    return losses


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="float32 training steps")
    p.add_argument("--check-steps", type=int, default=3, help="float64 steps compared")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=12, help="image height and width")
    p.add_argument("--width", type=int, default=8, help="channels of the first stage")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    images, labels = make_data(512, 4, args.size, g)

    torch.manual_seed(0)
    base = resnet_small(num_classes=4, widths=(args.width, 2 * args.width))
    base = base.to(memory_format=torch.channels_last)
    ours, summary = pykern.convert(base)
    print(summary)

    # 1. float64: step-by-step agreement.
    models64 = [copy.deepcopy(base).double(), copy.deepcopy(ours).double()]
    torch_losses, pykern_losses = train_side_by_side(
        models64, images, labels, args.check_steps, args.batch, 0.05, "cpu", torch.float64
    )
    print("step  torch (float64)         pykern (float64)        |difference|")
    for step, (a, b) in enumerate(zip(torch_losses, pykern_losses, strict=True)):
        print(f"{step:4d}  {a:.17f}  {b:.17f}  {abs(a - b):.1e}")
    max_rel = max(abs(a - b) / abs(a) for a, b in zip(torch_losses, pykern_losses, strict=True))

    # 2. float32 on the device: both converge.
    models32 = [copy.deepcopy(m).to(args.device) for m in (base, ours)]
    t32, p32 = train_side_by_side(
        models32, images, labels, args.steps, args.batch, 0.05, args.device, torch.float32
    )
    for step in range(0, args.steps, max(1, args.steps // 6)):
        print(f"float32 step {step:4d}  torch {t32[step]:.4f}  pykern {p32[step]:.4f}")
    print(f"float32 final       torch {t32[-1]:.4f}  pykern {p32[-1]:.4f}")
    return {
        "float64_max_rel_diff": max_rel,
        "torch_losses": t32,
        "pykern_losses": p32,
    }


if __name__ == "__main__":
    main()
