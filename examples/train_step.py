"""A few optimisation steps of a preset with cross-entropy + batch-hard triplet loss.

    python examples/train_step.py                  # RGA-SC ResNet-50 at 64x32, 6 steps
    python examples/train_step.py --preset apnet --steps 10

The data are synthetic identities: each identity is a random smooth image, each sample a noisy
copy of it; the batch holds P identities x K samples, as a re-id sampler would draw it. The head is
the usual BNNeck (BatchNorm1d on the pooled features, then a bias-free classifier): the triplet
loss sees the features before the BatchNorm, cross-entropy the logits after it. On one fixed batch
the loss must go down; the script prints it at every step and ends with
``loss <first> -> <last>``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reid_attention as ra


def batch_hard_triplet(features: Tensor, labels: Tensor, margin: float = 0.3) -> Tensor:
    """Hermans et al. 2017: for every anchor, its farthest positive and nearest negative."""
    dist = torch.cdist(features, features)
    same = labels[:, None] == labels[None, :]
    hardest_positive = dist.masked_fill(~same, float("-inf")).amax(1)
    hardest_negative = dist.masked_fill(same, float("inf")).amin(1)
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def synthetic_batch(identities: int, per_identity: int, size, generator: torch.Generator):
    """(P*K, 3, H, W) images, smooth per identity plus per-sample noise, and their labels."""
    h, w = size
    templates = F.interpolate(
        torch.randn(identities, 3, h // 8, w // 8, generator=generator),
        size=size,
        mode="bilinear",
        align_corners=False,
    )
    labels = torch.arange(identities).repeat_interleave(per_identity)
    images = templates[labels] + 0.3 * torch.randn(len(labels), 3, h, w, generator=generator)
    return images, labels


class ReIDModel(nn.Module):
    """A preset backbone with a BNNeck head: returns (pooled features, logits)."""

    def __init__(self, backbone: nn.Module, classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = nn.BatchNorm1d(backbone.num_features)
        self.neck.bias.requires_grad_(False)
        self.classifier = nn.Linear(backbone.num_features, classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: Tensor):
        features = self.backbone(x)
        return features, self.classifier(self.neck(features))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("rga", "apnet"), default="rga")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--identities", type=int, default=4, help="P identities per batch")
    parser.add_argument("--instances", type=int, default=2, help="K samples per identity")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 32), metavar=("H", "W"))
    args = parser.parse_args()
    torch.manual_seed(0)
    size = tuple(args.size)

    if args.preset == "rga":  # maps far smaller than the paper's: lower ratios keep widths >= 1
        backbone = ra.presets.rga_resnet50(input_size=size, spatial_ratio=2, down_ratio=4)
    else:
        backbone = ra.presets.apnet_resnet50(input_size=size)
    model = ReIDModel(backbone, args.identities).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    images, labels = synthetic_batch(args.identities, args.instances, size, torch.Generator().manual_seed(0))

    losses = []
    for step in range(args.steps):
        features, logits = model(images)
        ce, triplet = F.cross_entropy(logits, labels), batch_hard_triplet(features, labels)
        loss = ce + triplet
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        parts = f"cross-entropy {ce.item():.4f}, triplet {triplet.item():.4f}"
        print(f"step {step}: loss {losses[-1]:.4f} ({parts})")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
