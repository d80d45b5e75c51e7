"""A DCGAN-style generator (transposed convolutions, BatchNorm, ReLU) and a small discriminator
on pykern: forward and backward against the same models on torch, then a few GAN steps.

    python examples/dcgan.py [--steps 20] [--device cpu|cuda]

1. float64, on CPU: the converted generator's images, the gradients of its input noise and of
   every parameter agree with torch's.
2. float32 on the device (a GPU when present): adversarial training steps on synthetic "real"
   images (smooth random blobs); the losses stay finite.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import pykern
from pykern.models import dcgan_generator


def discriminator(nc: int, ndf: int, image_size: int) -> nn.Sequential:
    """DCGAN's discriminator: stride-2 4x4 convolutions down to 4x4, then one 4x4 convolution."""
    layers, c, size = [nn.Conv2d(nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2)], ndf, image_size // 2
    while size > 4:
        layers += [
            nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.LeakyReLU(0.2),
        ]
        c, size = 2 * c, size // 2
    return nn.Sequential(*layers, nn.Conv2d(c, 1, 4), nn.Flatten())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_generator(gen: nn.Module, nz: int, batch: int) -> float:
    """The largest relative difference between pykern and torch in float64: output, noise
    gradient, parameter gradients (one vector: a gradient that cancels to rounding noise has
    no meaningful relative difference of its own)."""
    ref = copy.deepcopy(gen).double()
    ours, _ = pykern.convert(ref)
    z = torch.randn(batch, nz, 1, 1, dtype=torch.float64)
    z_ref, z_ours = z.clone().requires_grad_(), z.clone().requires_grad_()
    out_ref, out = ref(z_ref), ours(z_ours)
    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    out.backward(g)
    diffs = [rel(out, out_ref), rel(z_ours.grad, z_ref.grad)]
    flat = lambda m: torch.cat([q.grad.flatten() for q in m.parameters()])  # noqa: E731
    diffs.append(rel(flat(ours), flat(ref)))  # all parameter gradients as one vector
    return max(diffs)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--nz", type=int, default=16)
    p.add_argument("--ngf", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    gen = dcgan_generator(args.nz, args.ngf, 3, args.image_size)
    disc = discriminator(3, args.ngf, args.image_size)

    max_diff = check_generator(gen, args.nz, 4)
    print(f"float64 generator forward+backward, pykern vs torch: max relative diff {max_diff:.1e}")

    (gen, g_summary), (disc, _) = pykern.convert(gen), pykern.convert(disc)
    print(g_summary)
    gen, disc = gen.to(args.device), disc.to(args.device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    blobs = F.avg_pool2d(torch.randn(256, 3, args.image_size + 6, args.image_size + 6), 7, 1).tanh()
    blobs = blobs.to(args.device)
    ones = torch.ones(args.batch, 1, device=args.device)
    losses = []
    for step in range(args.steps):
        real = blobs[torch.randint(0, len(blobs), (args.batch,))]
        fake = gen(torch.randn(args.batch, args.nz, 1, 1, device=args.device))
        opt_d.zero_grad()
        loss_d = F.binary_cross_entropy_with_logits(disc(real), ones) + (
            F.binary_cross_entropy_with_logits(disc(fake.detach()), 0 * ones)
        )
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad()
        loss_g = F.binary_cross_entropy_with_logits(disc(fake), ones)
        loss_g.backward()
        opt_g.step()
        losses.append((loss_d.item(), loss_g.item()))
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss D {loss_d.item():.4f}  loss G {loss_g.item():.4f}")
    return {"float64_max_rel_diff": max_diff, "losses": losses, "image_shape": tuple(fake.shape)}


if __name__ == "__main__":
    main()
