"""Train a small GAN on scikit-learn's digits: two models, two optimizers, an epoch by hand.

    python examples/gan.py            # 30 epochs
    python examples/gan.py --quick    # 3 epochs, a few seconds, for the test suite

``ft.train_epoch`` takes one loss and one optimizer; a GAN alternates two, so write its epoch
yourself, as below. The rest fits: ``ft.evaluate`` scores D on held-out real and fake digits,
``ft.predict`` samples G, and one checkpoint holds both models (an ``nn.ModuleDict``), G's
optimizer as ``optimizer`` and D's optimizer state in ``extra``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import fntrain as ft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import digits_splits

NOISE = 16


def generator() -> nn.Module:
    """Return an MLP from 16 noise numbers to a 1x8x8 image in [0, 1], as the digits are."""
    return nn.Sequential(nn.Linear(NOISE, 128), nn.ReLU(), nn.Linear(128, 64), nn.Sigmoid(),
                         nn.Unflatten(1, (1, 8, 8)))  # fmt: skip


def discriminator() -> nn.Module:
    """Return an MLP from a 1x8x8 image to one logit: > 0 means 'real'."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1))


def adam(model: nn.Module) -> torch.optim.Optimizer:
    """Return the Adam both models use (beta1 = 0.5, as GANs usually do)."""
    return torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.999))


def train_gan_epoch(g: nn.Module, d: nn.Module, g_opt: torch.optim.Optimizer,
                    d_opt: torch.optim.Optimizer, loader: DataLoader,
                    device: torch.device) -> tuple[float, float]:  # fmt: skip
    """Run one D step and one G step per real batch; return mean D and G losses over samples."""
    bce = nn.BCEWithLogitsLoss()
    g.train()
    d.train()
    d_sum, g_sum, seen = 0.0, 0.0, 0
    for real, _ in loader:
        real = real.to(device)
        n = len(real)
        ones, zeros = torch.ones(n, 1, device=device), torch.zeros(n, 1, device=device)
        fake = g(torch.randn(n, NOISE, device=device))  # detached for D's step, not for G's
        d_loss = (bce(d(real), ones) + bce(d(fake.detach()), zeros)) / 2  # D: real 1, fake 0
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = bce(d(fake), ones)  # G: D should say 1 (the grads this leaves in D: zeroed)
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        d_sum, g_sum, seen = d_sum + d_loss.item() * n, g_sum + g_loss.item() * n, seen + n
    return d_sum / seen, g_sum / seen


def held_out(g: nn.Module, real: torch.Tensor, device: torch.device) -> ft.TensorLoader:
    """Return batches of real images (target 1.0) and as many new fakes (target 0.0)."""
    fake = ft.predict(g, [torch.randn(len(real), NOISE)], device).outputs
    targets = torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)])
    return ft.TensorLoader(torch.cat([real, fake]), targets, batch_size=256)


def main() -> None:
    """Train, checkpoint both models and optimizers, and check the checkpoint loads back."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 epochs, for smoke tests")
    parser.add_argument("--out", type=Path, default=Path("gan.pt"), help="checkpoint file")
    args = parser.parse_args()
    epochs = 3 if args.quick else args.epochs
    args.out.parent.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    device = ft.default_device()
    train_set, val_set, _ = digits_splits(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=gen)
    g, d = generator().to(device), discriminator().to(device)
    g_opt, d_opt = adam(g), adam(d)
    both = nn.ModuleDict({"generator": g, "discriminator": d})  # one model for the checkpoint

    print(f"device {device}: {len(train_set)} real digits; held-out D acc 0.5: G fools D")
    for epoch in range(1, epochs + 1):
        d_loss, g_loss = train_gan_epoch(g, d, g_opt, d_opt, loader, device)
        ev = ft.evaluate(d, held_out(g, val_set.tensors[0], device), nn.BCEWithLogitsLoss(),
                         device, metrics={"acc": ft.accuracy()})  # fmt: skip
        print(f"epoch {epoch:2d}  D loss {d_loss:.4f}  G loss {g_loss:.4f}  "
              f"held-out D acc {ev.metrics['acc']:.4f}")  # fmt: skip
        ft.save_checkpoint(args.out, both, g_opt, epoch=epoch, metrics=ev.metrics,
                           extra={"d_optimizer": d_opt.state_dict()})  # fmt: skip

    noise = torch.randn(16, NOISE, generator=torch.Generator().manual_seed(1))
    samples = ft.predict(g, [noise], device).outputs
    new_g, new_d = generator().to(device), discriminator().to(device)
    new_g_opt, new_d_opt = adam(new_g), adam(new_d)
    new_both = nn.ModuleDict({"generator": new_g, "discriminator": new_d})
    ckpt = ft.load_checkpoint(args.out, new_both, new_g_opt, map_location=device)
    new_d_opt.load_state_dict(ckpt.extra["d_optimizer"])  # a plain dict inside read-only extra
    assert torch.equal(ft.predict(new_g, [noise], device).outputs, samples)
    for old, new in ((g_opt, new_g_opt), (d_opt, new_d_opt)):  # Adam's steps and moments
        torch.testing.assert_close(new.state_dict(), old.state_dict(), rtol=0, atol=0)
    print(f"loaded epoch {ckpt.epoch} into fresh G, D and optimizers: the same samples")


if __name__ == "__main__":
    main()
