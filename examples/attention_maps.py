"""Collect the attention maps of a wrapped backbone for one image and save an overlay grid (PNG).

    python examples/attention_maps.py                          # synthetic person, RGA-S, ResNet-50
    python examples/attention_maps.py --image person.png --attention pfsa --out maps.png

The backbone is torchvision's ResNet-50 (last stride 1) with ``--attention`` inserted after
layer1 .. layer4, random init unless ``--weights`` names a state_dict file for it (e.g. a converted official
checkpoint): with random weights the maps only show the mechanics. The map of a site is the
attention's per-position gain ``|out| / |in|`` (channel-wise norms of its output and input,
captured by forward hooks in this script only): for a spatial gate such as RGA-S or PFSA it is
the gate itself, for a channel attention it is flat up to the channel mix. All panels share one
colour scale (the colorbar), so the sites can be compared; each title names the attention kind
and whether the weights are random.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

import reid_attention as ra

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def synthetic_person(size) -> torch.Tensor:
    """(3, H, W) in [0, 1]: a head, a torso, two legs on a light background."""
    h, w = size
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    image = torch.stack([0.85 - 0.1 * y, 0.85 - 0.05 * y, 0.8 + 0 * y])
    head = ((y - 0.12) / 0.07) ** 2 + ((x - 0.5) / 0.13) ** 2 < 1
    torso = (y > 0.2) & (y < 0.58) & ((x - 0.5).abs() < 0.22 - 0.05 * (0.58 - y))
    legs = (y >= 0.56) & (y < 0.97) & ((x - 0.4).abs() < 0.07) | (y >= 0.56) & (y < 0.97) & (
        (x - 0.6).abs() < 0.07
    )
    for mask, colour in ((head, (0.9, 0.7, 0.55)), (torso, (0.75, 0.1, 0.1)), (legs, (0.1, 0.15, 0.4))):
        image[:, mask] = torch.tensor(colour)[:, None]
    return image


def load_image(path: str, size) -> torch.Tensor:
    """(3, H, W) in [0, 1], resized to ``size``."""
    image = torch.from_numpy(plt.imread(path)).float()
    if image.max() > 1:
        image = image / 255
    image = image[..., :3].permute(2, 0, 1) if image.dim() == 3 else image.expand(3, *image.shape)
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def attention_maps(model: torch.nn.Module, image: torch.Tensor) -> dict:
    """{inserted attention name: (h, w) gain map} for one normalised (3, H, W) image."""
    maps, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith("attention") and isinstance(
            module, (ra.RGA, ra.ParameterFreeSpatialAttention, ra.APNetC, ra.APNetS)
        ):

            def hook(_module, args, out, name=name):
                maps[name] = out.norm(dim=1)[0] / args[0].norm(dim=1)[0].clamp_min(1e-12)

            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(((image - MEAN[:, None, None]) / STD[:, None, None])[None])
    for handle in handles:
        handle.remove()
    return maps


def plot_maps(image: torch.Tensor, maps: dict, out: str, *, kind: str, weights) -> None:
    """The input, then each site's gain over it, on one shared colour scale with a colorbar."""
    size = tuple(image.shape[1:])
    origin = "trained weights" if weights else "random weights"
    norm = Normalize(min(float(g.min()) for g in maps.values()), max(float(g.max()) for g in maps.values()))
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2 * (len(maps) + 1) + 1, 4.4), layout="constrained")
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title("input", fontsize=8)
    for ax, (name, gain) in zip(axes[1:], maps.items()):
        up = F.interpolate(gain[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.imshow(up.numpy(), cmap="jet", norm=norm, alpha=0.5)
        ax.set_title(f"{name.rsplit('.', 1)[0]}: {kind}\n{tuple(gain.shape)}, {origin}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(ScalarMappable(norm=norm, cmap="jet"), ax=list(axes[1:]), shrink=0.8,
                 label="gain |out| / |in| (one scale for all sites)")
    source = f" ({weights})" if weights else " (the maps show the mechanics only)"
    fig.suptitle(f"{kind} attention maps, ResNet-50 at {size[0]}x{size[1]}, {origin}{source}", fontsize=9)
    fig.savefig(out, dpi=100, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="an image file (PNG); default: a synthetic person")
    parser.add_argument("--attention", default="rga_s", help=f"one of {ra.list_attentions()}")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    parser.add_argument("--weights", help="a state_dict file for the wrapped ResNet-50")
    parser.add_argument("--out", default="attention_maps.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    size = tuple(args.size)

    model = ra.set_last_stride(tvm.resnet50(weights=None), 1)
    # The RGA paper's sites. With last stride 1, layer3 and layer4 share stride 16, so the default
    # sites (the last stage end at each stride) would hold layer4 only.
    sites = ["layer1", "layer2", "layer3", "layer4"]
    ra.insert_attention(model, args.attention, sites=sites, input_size=size)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu"), strict=False)
    image = load_image(args.image, size) if args.image else synthetic_person(size)
    maps = attention_maps(model, image)

    plot_maps(image, maps, args.out, kind=args.attention, weights=args.weights)
    print(f"saved {len(maps)} attention maps ({', '.join(maps)}) to {args.out}")


if __name__ == "__main__":
    main()
