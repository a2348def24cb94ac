"""Test oracle: the official RGA_Module's forward, re-expressed independently for comparison.

It mirrors the official computation (microsoft/Relation-Aware-Global-Attention-Networks,
reid/models/models_utils/rga_modules.py) on an ``ra.RGA`` module's own sub-networks, using the
nn.Module calls on 4-D tensors exactly as the official forward does.
"""

import torch


def official_forward(m, x):
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
        x = torch.sigmoid(logits) * x
    return x
