"""Test oracle: the official RGA_Module, re-expressed independently for comparison.

:func:`official_forward` mirrors the official computation (microsoft/Relation-Aware-Global-
Attention-Networks, reid/models/models_utils/rga_modules.py) on any module holding the official
sub-networks (``theta_spatial`` ... ``W_channel``, flags ``spatial`` / ``channel``), using the
nn.Module calls on 4-D tensors as the official forward does: an ``ra.RGA`` (to compare its paths
with the official computation on the same modules) or an :class:`OfficialRGAModule`, built from
torch.nn alone with the official names and widths (no reid_attention code at all).
"""

import torch
from torch import nn


def _cbr(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU())


def _w_network(width: int, down_ratio: int) -> nn.Sequential:
    hidden = width // down_ratio
    return nn.Sequential(
        nn.Conv2d(width, hidden, 1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, 1, 1, bias=False),
        nn.BatchNorm2d(1),
    )


class OfficialRGAModule(nn.Module):
    """The official ``RGA_Module(in_channel, in_spatial, use_spatial, use_channel, cha_ratio,
    spa_ratio, down_ratio)``: its sub-networks, names and widths (no width floors), from torch.nn.

    Spatial axis: tokens are the H*W positions with C features; channel axis: tokens are the C
    channels with H*W features. Per axis (d features, n tokens, d' = d // ratio_d and
    n' = n // ratio_n): theta, phi, gx = CBR(d -> d'), gg = CBR(2n -> n'), W = conv(1 + n' ->
    (1 + n') // down_ratio), BN, ReLU, conv(-> 1), BN.
    """

    def __init__(self, in_channel, in_spatial, use_spatial=True, use_channel=True, cha_ratio=8,
                 spa_ratio=8, down_ratio=8):
        super().__init__()
        self.spatial, self.channel = use_spatial, use_channel
        inter_channel, inter_spatial = in_channel // cha_ratio, in_spatial // spa_ratio
        if use_spatial:
            self.gx_spatial = _cbr(in_channel, inter_channel)
            self.gg_spatial = _cbr(2 * in_spatial, inter_spatial)
            self.W_spatial = _w_network(1 + inter_spatial, down_ratio)
            self.theta_spatial = _cbr(in_channel, inter_channel)
            self.phi_spatial = _cbr(in_channel, inter_channel)
        if use_channel:
            self.gx_channel = _cbr(in_spatial, inter_spatial)
            self.gg_channel = _cbr(2 * in_channel, inter_channel)
            self.W_channel = _w_network(1 + inter_channel, down_ratio)
            self.theta_channel = _cbr(in_spatial, inter_spatial)
            self.phi_channel = _cbr(in_spatial, inter_spatial)

        self.recorded = None  # set to a list to collect the logits of every call

    def forward(self, x):
        return official_forward(self, x, self.recorded)


def official_forward(m, x, record=None):
    """The official RGA_Module forward on ``m``'s sub-networks; ``record`` (a list), if given,
    receives the attention logits: spatial (B, 1, H, W), then channel (B, C, 1, 1)."""
    b, c, h, w = x.shape
    n = h * w
    if m.spatial:
        theta = m.theta_spatial(x).reshape(b, -1, n).permute(0, 2, 1)
        phi = m.phi_spatial(x).reshape(b, -1, n)
        rel = torch.matmul(theta, phi)
        rel_in = rel.permute(0, 2, 1).reshape(b, n, h, w)
        rel_out = rel.reshape(b, n, h, w)
        joint = m.gg_spatial(torch.cat((rel_in, rel_out), 1))
        g = torch.mean(m.gx_spatial(x), dim=1, keepdim=True)
        logits = m.W_spatial(torch.cat((g, joint), 1))
        if record is not None:
            record.append(logits)
        x = torch.sigmoid(logits.expand_as(x)) * x
    if m.channel:
        xc = x.reshape(b, c, -1).permute(0, 2, 1).unsqueeze(-1)
        theta = m.theta_channel(xc).squeeze(-1).permute(0, 2, 1)
        phi = m.phi_channel(xc).squeeze(-1)
        rel = torch.matmul(theta, phi)
        joint = torch.cat((rel.permute(0, 2, 1).unsqueeze(-1), rel.unsqueeze(-1)), 1)
        joint = m.gg_channel(joint)
        g = torch.mean(m.gx_channel(xc), dim=1, keepdim=True)
        logits = m.W_channel(torch.cat((g, joint), 1)).transpose(1, 2)
        if record is not None:
            record.append(logits)
        x = torch.sigmoid(logits) * x
    return x
