"""Evaluation during training: when do RGA's eval-mode gates collapse, and does
``ra.recalibrate_norms`` restore them?

A small re-ID run on the synthetic Market-1501 of the integration tests
(``tests/integrations/reid_data.py``, drawn at the input size: no resizing): the network
(``ra.presets.rga_resnet50(input_size=...)``, random init, plus torchreid's head: BNNeck and a
bias-free classifier, :class:`reid_attention.integrations.torchreid.TorchreidModel`) is trained
with cross-entropy (label smoothing 0.1) and random flips under SGD and Adam (torchreid's
defaults: Adam lr 3e-4, weight decay 5e-4; SGD lr 0.01, momentum 0.9, weight decay 5e-4), and
after every epoch it is evaluated twice on the same weights:

* ``as trained``: ``model.eval()`` with the running statistics training left (momentum 0.1);
* ``recalibrated``: a copy after ``ra.recalibrate_norms(copy, train_batches, num_batches=10)``
  (one pass of the shuffled, flipped training set, at most 10 batches, as with torchreid's
  ``datamanager.train_loader``).

Per evaluation: ``max_logit``, the largest |RGA gate logit| over every layer and axis in eval
mode on the test images; ``saturated``, the share of gate values whose |logit| > 15 (sigmoid
within 3e-7 of 0 or 1); ``spread``, the mean pairwise cosine distance of the pooled (B, 2048)
backbone features of the test images (0: all alike); ``zero``, the share of images whose pooled
features are all zero; ``mAP`` and ``rank1`` of the BNNeck features (what torchreid ranks,
Euclidean distance, Market-1501 protocol: same-camera matches of the query's identity left out).
The gallery is shuffled once (fixed seed) so that tied distances rank in random order; ``chance``
in the summary is the mean mAP / rank-1 of random rankings. A plain ResNet-50 (last stride 1, the
same head) is the control.

Two more evaluations of the RGA models say which statistics matter (``--no-diagnose`` skips them):
``recal. RGA norms only`` keeps the trained statistics everywhere but inside the RGA layers,
``recal. other norms only`` the reverse. ``--models rga_resnet50_momentum1`` trains the same
network with every BatchNorm's momentum at 1.0: the training function (and so the weights) is
unchanged -- a BatchNorm in training mode never reads its running statistics -- and eval mode
uses the statistics of the last training batch.

    python benchmarks/eval_collapse.py             # -> results/eval_collapse_cpu.json
    python benchmarks/eval_collapse.py --quick     # smoke run (tiny), nothing written
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import reid_attention as ra
from reid_attention.bench.report import environment, publish
from reid_attention.integrations.torchreid import TorchreidModel

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests" / "integrations"))
from reid_data import make_market1501  # noqa: E402 (importable only after the sys.path insert above)

COLUMNS = ["model", "optimiser", "epoch", "steps", "stats", "max_logit", "saturated", "spread", "zero",
           "mAP", "rank1", "loss"]
HEADERS = {"max_logit": "max |logit|", "saturated": "saturated", "spread": "spread (cos)",
           "zero": "zero feats"}
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
SATURATED = 15.0


# ------------------------------------------------------------------------------------------- data


def load(split):
    from PIL import Image

    images = torch.stack([torch.from_numpy(np.array(Image.open(path).convert("RGB")))
                          for path, _, _ in split])
    images = (images.permute(0, 3, 1, 2).float() / 255 - MEAN[:, None, None]) / STD[:, None, None]
    return images, torch.tensor([p for _, p, _ in split]), torch.tensor([c for _, _, c in split])


def train_batches(images, labels, batch, generator):
    """One shuffled pass with random horizontal flips, full batches only (a torchreid train loader)."""
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(order) - batch + 1, batch):
        index = order[start:start + batch]
        x = images[index]
        flip = torch.rand(len(index), generator=generator) < 0.5
        yield torch.where(flip[:, None, None, None], x.flip(-1), x), labels[index]


# ------------------------------------------------------------------------------------------- model


def build(name, size, num_classes, seed):
    torch.manual_seed(seed)
    if name.startswith("rga_resnet50"):
        backbone = ra.presets.rga_resnet50(input_size=size)
    elif name == "resnet50":
        from torchvision.models import resnet50

        backbone = ra.presets.ReIDResNet(ra.set_last_stride(resnet50(), 1))
    else:
        raise ValueError(name)
    model = TorchreidModel(backbone, 2048, num_classes)
    if name.endswith("_momentum1"):  # running statistics = the last training batch's; training unchanged
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
    return model


def partly(model, recalibrated, inside_rga):
    """A copy of ``model`` with the recalibrated statistics of the norms inside RGA layers only
    (``inside_rga``) or of the others only."""
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, ra.RGA))
    twin = copy.deepcopy(model)
    state = twin.state_dict()
    for key, value in recalibrated.state_dict().items():
        statistic = key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        if statistic and key.startswith(prefixes) == inside_rga:
            state[key] = value
    twin.load_state_dict(state)
    return twin


def optimiser(name, model):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=5e-4)
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


@contextlib.contextmanager
def gate_logits(model):
    """Record max |logit| and the saturated count of every RGA gate while inside: forward hooks on
    the last norm of each W network (``W_spatial[4]``, ``W_channel[4]``, the official slots),
    whose output is the gate logit. A norm with a hook is called as a module on every path."""
    store = {"max": 0.0, "saturated": 0, "count": 0, "nonfinite": 0}

    def record(module, inputs, out):
        out = out.detach()
        finite = out[torch.isfinite(out)].abs()
        store["max"] = max(store["max"], float(finite.max()) if finite.numel() else math.inf)
        store["saturated"] += int((finite > SATURATED).sum()) + (out.numel() - finite.numel())
        store["nonfinite"] += out.numel() - finite.numel()
        store["count"] += out.numel()

    handles = [getattr(layer, f"W_{axis}")[4].register_forward_hook(record)
               for layer in model.modules() if isinstance(layer, ra.RGA) for axis in layer.widths]
    try:
        yield store if handles else None
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------- metrics


def features(model, images, batch=64):
    pooled, neck = [], []
    hook = model.backbone.register_forward_hook(lambda m, i, o: pooled.append(o.detach()))
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                neck.append(model(images[start:start + batch]))
    finally:
        hook.remove()
    return torch.cat(pooled).double(), torch.cat(neck).double()


def spread(x):
    """Mean pairwise cosine distance among the non-zero rows; the share of zero rows."""
    norms = x.norm(dim=1)
    zero = norms <= 1e-12 * max(float(norms.max()), 1e-300)
    rows = x[~zero]
    if len(rows) < 2:
        return 0.0, float(zero.float().mean())
    unit = F.normalize(rows, dim=1)
    sim = unit @ unit.T
    n = len(rows)
    mean_sim = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    return max(float(1 - mean_sim), 0.0), float(zero.float().mean())  # rounding can leave -1e-15


def rank(dist, qp, qc, gp, gc):
    """(mAP, rank-1) of a (Q, G) distance matrix, Market-1501 protocol; stable order on ties."""
    aps, top1 = [], []
    for i in range(dist.shape[0]):
        keep = ~((gp == qp[i]) & (gc == qc[i]))
        order = torch.argsort(dist[i][keep], stable=True)
        match = (gp[keep] == qp[i])[order]
        if not bool(match.any()):
            continue
        positions = torch.nonzero(match).flatten().double() + 1
        aps.append(float((torch.arange(1, len(positions) + 1, dtype=torch.float64) / positions).mean()))
        top1.append(float(match[0]))
    return sum(aps) / len(aps), sum(top1) / len(top1)


def chance(qp, qc, gp, gc, draws=200):
    g = torch.Generator().manual_seed(0)
    results = [rank(torch.rand(len(qp), len(gp), generator=g, dtype=torch.float64), qp, qc, gp, gc)
               for _ in range(draws)]
    return {"mAP": sum(r[0] for r in results) / draws, "rank1": sum(r[1] for r in results) / draws}


def evaluate(model, test):
    (qx, qp, qc), (gx, gp, gc) = test
    model.eval()
    with gate_logits(model) as logits:
        pooled_q, neck_q = features(model, qx)
        pooled_g, neck_g = features(model, gx)
    cos, zero = spread(torch.cat([pooled_q, pooled_g]))
    neck_q, neck_g = neck_q.nan_to_num(nan=0.0), neck_g.nan_to_num(nan=0.0)
    m_ap, rank1 = rank(torch.cdist(neck_q, neck_g), qp, qc, gp, gc)
    out = {"spread": cos, "zero": zero, "mAP": m_ap, "rank1": rank1}
    if logits is not None:
        out.update(max_logit=logits["max"], saturated=logits["saturated"] / max(logits["count"], 1),
                   nonfinite=logits["nonfinite"])
    return out


# ------------------------------------------------------------------------------------------- run


def run(args, data, log):
    train_x, train_labels, _ = load(data.split("train", relabel=True))
    query = load(data.split("query"))
    gallery = load(data.split("gallery"))
    shuffle = torch.randperm(len(gallery[0]), generator=torch.Generator().manual_seed(1))
    gallery = tuple(t[shuffle] for t in gallery)
    test = (query, gallery)
    records = []
    configs = [(m, o) for m in args.models for o in args.optimisers]
    for model_name, opt_name in configs:
        model = build(model_name, args.size, int(train_labels.max()) + 1, args.seed)
        opt = optimiser(opt_name, model)
        generator = torch.Generator().manual_seed(args.seed)
        steps = 0
        for epoch in range(1, args.epochs + 1):
            model.train()
            start, losses = time.perf_counter(), []
            for x, y in train_batches(train_x, train_labels, args.batch, generator):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                steps += 1
            train_s = time.perf_counter() - start
            common = {"model": model_name, "optimiser": opt_name, "epoch": epoch, "steps": steps,
                          "loss": sum(losses) / len(losses)}
            start = time.perf_counter()
            records.append(dict(common, stats="as trained", **evaluate(model, test)))
            eval_s = time.perf_counter() - start
            start = time.perf_counter()
            twin = copy.deepcopy(model)
            ra.recalibrate_norms(twin,
                                 (x for x, _ in train_batches(train_x, train_labels, args.batch, generator)),
                                 num_batches=args.recalibrate_batches)
            recal_s = time.perf_counter() - start
            records.append(dict(common, stats="recalibrated", **evaluate(twin, test)))
            rows = 2
            if args.diagnose and any(isinstance(m, ra.RGA) for m in model.modules()):
                records.append(dict(common, stats="recal. RGA norms only",
                                    **evaluate(partly(model, twin, True), test)))
                records.append(dict(common, stats="recal. other norms only",
                                    **evaluate(partly(model, twin, False), test)))
                rows = 4
            for record in records[-rows:]:
                record.update(train_s=round(train_s, 2), eval_s=round(eval_s, 2),
                              recalibrate_s=round(recal_s, 2))
            log(f"{model_name} {opt_name} epoch {epoch} ({steps} steps, train {train_s:.0f}s, "
                f"recalibrate {recal_s:.0f}s): " + "; ".join(
                    f"{r['stats']}: max|logit| {r.get('max_logit', float('nan')):.3g}, "
                    f"spread {r['spread']:.3g}, "
                    f"mAP {r['mAP']:.3f}, rank-1 {r['rank1']:.3f}" for r in records[-rows:]))
    summary = {"chance": chance(query[1], query[2], gallery[1], gallery[2])}
    return records, summary


def size_pair(text):
    h, w = text.lower().split("x")
    return int(h), int(w)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=size_pair, default=(128, 64), help="input HxW (default 128x64)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-ids", type=int, default=16, help="training identities (2 cameras each)")
    parser.add_argument("--test-ids", type=int, default=8)
    parser.add_argument("--images", type=int, default=4, help="images per identity and camera")
    parser.add_argument("--models", nargs="+", default=["rga_resnet50", "resnet50"],
                        choices=["rga_resnet50", "resnet50", "rga_resnet50_momentum1"],
                        help="rga_resnet50_momentum1: every BatchNorm's momentum 1.0 (eval uses the last "
                        "training batch's statistics; the training function is unchanged)")
    parser.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                        help="skip the evaluations with only the RGA norms / only the other norms "
                        "recalibrated")
    parser.add_argument("--optimisers", nargs="+", default=["sgd", "adam"], choices=["sgd", "adam"])
    parser.add_argument("--recalibrate-batches", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64x32, 1 epoch, 4 ids; nothing written")
    parser.add_argument("--out", type=pathlib.Path,
                        help="JSON path (default results/eval_collapse_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.epochs, args.train_ids, args.test_ids, args.images, args.batch = (
            (64, 32), 1, 4, 4, 2, 8)
    for name in ("batch", "epochs", "train_ids", "test_ids", "images", "recalibrate_batches", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_market1501(tmp, train_ids=args.train_ids, test_ids=args.test_ids, cameras=2,
                               images_per_camera=args.images, size=args.size, seed=args.seed)
        records, summary = run(args, data, lambda line: print(line, file=sys.stderr, flush=True))
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary["load_average_1min"] = round(os.getloadavg()[0], 2)  # the wall time on a shared machine
    config = {"size": list(args.size), "batch": args.batch, "epochs": args.epochs,
                  "train_images": args.train_ids * 2 * args.images,
                  "train_ids": args.train_ids, "test_ids": args.test_ids, "images_per_camera": args.images,
                  "recalibrate_batches": args.recalibrate_batches, "seed": args.seed, "init": "random",
                  "loss": "cross-entropy, label smoothing 0.1", "augmentation": "random horizontal flip",
                  "adam": "lr 3e-4, weight decay 5e-4", "sgd": "lr 0.01, momentum 0.9, weight decay 5e-4",
                  "head": "BNNeck (BatchNorm1d, bias fixed at 0) + bias-free linear classifier"}
    result = {"environment": environment("cpu", args.threads), "config": config, "records": records,
              "summary": summary}
    publish(result, COLUMNS, RESULTS / "eval_collapse_cpu.json", headers=HEADERS, out=args.out,
            write=not args.quick)


if __name__ == "__main__":
    main()
