"""List a torchvision backbone's insertion sites, insert each attention kind, print the overhead.

    python examples/wrap_torchvision.py                      # ResNet-50, 256x128, last stride 1
    python examples/wrap_torchvision.py --model mobilenet_v3_large --size 256 128

Everything runs on the meta device (shapes only, no weights in memory, no arithmetic): the
parameter counts are exact, and FLOPs are counted by torch.utils.flop_counter.FlopCounterMode
for one image, as 2 x multiply-adds.
"""

from __future__ import annotations

import argparse

import torch
import torchvision.models as tvm
from torch.utils.flop_counter import FlopCounterMode

import reid_attention as ra


def build(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = getattr(tvm, name)(weights=None)
    if hasattr(model, "layer4"):
        ra.set_last_stride(model, 1)  # the re-id convention for ResNets
    return model


def cost(model: torch.nn.Module, size) -> tuple:
    """(parameters, FLOPs) of one (1, 3, H, W) forward."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.empty(1, 3, *size, device="meta"))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision.models builder name")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    args = parser.parse_args()
    size = tuple(args.size)

    print(f"{args.model} at {size[0]}x{size[1]}: stage ends (default sites: reduction >= 4)")
    print(f"  {'site':<28} {'channels':>8} {'map':>9} {'stride':>6} layout")
    for site in ra.list_sites(build(args.model), size):
        h, w = site.feat_size
        print(f"  {site.name:<28} {site.channels:>8} {f'{h}x{w}':>9} {site.reduction:>6} {site.layout}")

    base_params, base_flops = cost(build(args.model), size)
    print(f"\nbaseline: {base_params / 1e6:.2f} M parameters, {base_flops / 1e9:.2f} GFLOPs (2 x MACs)")
    print(f"  {'attention':<10} {'+params (M)':>12} {'+GFLOPs':>9} {'overhead':>9}")
    for name in ra.list_attentions():
        model = build(args.model)
        try:
            ra.insert_attention(model, name, input_size=size)
        except ValueError as err:  # e.g. a map too small for the attention's ratios
            print(f"  {name:<10} cannot be inserted: {err}")
            continue
        params, flops = cost(model, size)
        print(
            f"  {name:<10} {(params - base_params) / 1e6:>12.3f} {(flops - base_flops) / 1e9:>9.3f} "
            f"{100 * (flops - base_flops) / base_flops:>8.1f}%"
        )


if __name__ == "__main__":
    main()
