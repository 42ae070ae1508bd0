"""Fine-tune a new head over a frozen torchvision backbone whose BatchNorm stays in eval mode.

    python examples/finetune_frozen_bn.py           # resnet18 backbone, 3 epochs on FakeData
    python examples/finetune_frozen_bn.py --quick   # seconds

``model.train()``, which train_epoch calls, would put the backbone's BatchNorm layers back in
train mode, and their running statistics would drift towards the new data. Overriding
``train()`` keeps them in eval; fntrain calls that override and afterwards restores every
module's own mode, so the frozen statistics never move. (With real data, load pretrained
weights with ``resnet18(weights=...)``; this example uses random weights and FakeData, so it
runs offline.)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import FakeData
from torchvision.models import resnet18
from torchvision.transforms import ToTensor

import fntrain as ft


class FrozenBackbone(nn.Module):
    """A resnet18 feature extractor, frozen, with a new linear head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.backbone = resnet18(weights=None)
        self.backbone.fc = nn.Identity()
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(512, classes)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Set train/eval mode, but keep the backbone (and its BatchNorm) in eval."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class scores."""
        return self.head(self.backbone(images))


def main() -> None:
    """Train the head; check the backbone's statistics and weights did not move."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 epoch on 64 images")
    args = parser.parse_args()
    epochs, size = (1, 64) if args.quick else (args.epochs, 512)

    torch.manual_seed(0)
    data = FakeData(size=size, image_size=(3, 32, 32), num_classes=10, transform=ToTensor())
    loader = DataLoader(data, batch_size=16, shuffle=True)
    model = FrozenBackbone(classes=10).train()
    optimizer = torch.optim.AdamW(ft.param_groups(model, weight_decay=1e-2), lr=1e-3)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.clone()

    for epoch in range(epochs):
        tr = ft.train_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, "cpu",
                            metrics={"acc": ft.accuracy()})  # fmt: skip
        print(f"epoch {epoch + 1}: loss {tr.loss:.4f}  acc {tr.metrics['acc']:.3f}")

    unchanged = all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    print(f"backbone weights and BatchNorm statistics unchanged: {unchanged}")
    print(f"head trained: {not torch.equal(head_before, model.head.weight)}")
    print(f"modes afterwards: model.training={model.training}, "
          f"backbone.training={model.backbone.training}")  # fmt: skip
    if not unchanged or model.backbone.training:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
