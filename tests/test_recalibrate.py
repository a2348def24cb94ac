"""``ra.recalibrate_norms``: BatchNorm running statistics re-estimated as a cumulative average.

The statistics equal a direct average over the batches (float64), parameters, modes and momenta
are kept, a model whose statistics are wrong gets back the eval outputs of its training-mode
statistics, the batch formats of torchreid / fast-reid loaders are read, and the torchreid
recipe of docs/training.md ("Evaluation during training") runs: with a fake engine everywhere,
with torchreid's own engine where torchreid is installed.
"""

from __future__ import annotations

import copy
import importlib
import pathlib
import re
import sys
import types

import pytest
import torch
from torch import nn

import reid_attention as ra

ROOT = pathlib.Path(__file__).resolve().parent.parent
F64 = torch.float64


def small_net(dtype=F64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(5),
    ).to(dtype)


def make_batches(count=4, batch=5, size=(6, 4), dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    # each batch its own offset and scale, so that the average differs from any one batch
    return [torch.randn(batch, 3, *size, generator=g, dtype=dtype) * (1 + i) + i for i in range(count)]


def direct_average(net: nn.Sequential, batches) -> dict:
    """Per BatchNorm: the mean over batches of its input's batch mean and unbiased variance,
    the net run with batch statistics (training mode) layer by layer."""
    sums = {}
    for x in batches:
        for layer in net:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                dims = [0] + list(range(2, x.dim()))
                mean = x.mean(dims)
                var = x.var(dims, correction=1)
                biased = x.var(dims, correction=0)
                s = sums.setdefault(layer, [0, 0])
                s[0], s[1] = s[0] + mean, s[1] + var
                shape = [1, -1] + [1] * (x.dim() - 2)
                x = (x - mean.view(shape)) / torch.sqrt(biased.view(shape) + layer.eps)
                x = x * layer.weight.view(shape) + layer.bias.view(shape)
            else:
                x = layer(x)
    return {m: (s[0] / len(batches), s[1] / len(batches)) for m, s in sums.items()}


def randomize(net: nn.Module, seed=3) -> nn.Module:
    """Affine parameters and deliberately wrong running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 50)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1e-3 + 1e-4)
    return net


def norms(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ---------------------------------------------------------------------------------------------
# the statistics


def test_statistics_are_the_cumulative_average_of_the_batches():
    net, batches = randomize(small_net()), make_batches()
    expected = direct_average(net, batches)
    assert ra.recalibrate_norms(net, batches) is net
    for m in norms(net):
        mean, var = expected[m]
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(m.num_batches_tracked) == len(batches)


def test_num_batches_draws_only_what_it_uses():
    net, batches = small_net(), make_batches(count=5)
    drawn = []

    def loader():
        for i, b in enumerate(batches):
            drawn.append(i)
            yield b

    ra.recalibrate_norms(net, loader(), num_batches=2)
    assert drawn == [0, 1]
    expected = direct_average(net, batches[:2])
    for m in norms(net):
        torch.testing.assert_close(m.running_mean, expected[m][0], rtol=1e-12, atol=1e-12)
    ra.recalibrate_norms(net, batches[:3], num_batches=10)  # fewer batches than asked: all of them
    assert all(int(m.num_batches_tracked) == 3 for m in norms(net))


def test_parameters_modes_and_momenta_are_kept():
    net = randomize(small_net())
    net[4].momentum = None
    net[8].momentum = 0.3
    net.eval()
    net[1].train()  # a mixed tree: restored module by module
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    modes = {n: m.training for n, m in net.named_modules()}
    momenta = [m.momentum for m in norms(net)]
    ra.recalibrate_norms(net, make_batches())
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())
    assert all(p.grad is None for p in net.parameters())
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert [m.momentum for m in norms(net)] == momenta == [0.1, None, 0.3]


def test_momentum_keeps_the_old_statistics_and_updates_them():
    net, batches = randomize(small_net()), make_batches(count=1)
    old = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms(net)]
    expected = direct_average(net, batches)
    ra.recalibrate_norms(net, batches, momentum=0.25)
    for m, (mean, var, count) in zip(norms(net), old):
        torch.testing.assert_close(m.running_mean, 0.75 * mean + 0.25 * expected[m][0],
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, 0.75 * var + 0.25 * expected[m][1], rtol=1e-12, atol=1e-12)
        assert int(m.num_batches_tracked) == count + 1
        assert m.momentum == 0.1


def test_wrong_statistics_give_back_the_training_mode_outputs():
    """An RGA-SC layer behind a small stem, statistics deliberately wrong: after recalibration on
    a batch, eval mode on that batch gives the training-mode (batch statistics) output, up to the
    unbiased-variance factor n / (n - 1) of the running variance."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        ra.RGA(16, (8, 4)), nn.AdaptiveAvgPool2d(1), nn.Flatten()).to(F64)
    randomize(net)
    x = torch.randn(64, 3, 8, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    with torch.no_grad():
        target = copy.deepcopy(net).train()(x)
        before = net.eval()(x)
    def error(out):
        return ((out - target).norm() / target.norm()).item()
    assert error(before) > 0.5
    ra.recalibrate_norms(net, [x])
    with torch.no_grad():
        after = net(x)
    assert not net.training
    assert error(after) < 2e-3, error(after)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_rga_paths_recalibrate_alike(impl):
    """momentum=None sends the fused path's norms through the modules: both paths give the same
    statistics, and those of a direct training-mode pass."""
    torch.manual_seed(0)
    layer = randomize(ra.RGA(16, (6, 4), impl=impl).to(F64))
    reference = copy.deepcopy(layer)
    reference.impl = "reference"
    batches = [torch.randn(4, 16, 6, 4, dtype=F64, generator=torch.Generator().manual_seed(i)) + i
               for i in range(3)]
    ra.recalibrate_norms(layer, batches)
    for m in norms(reference):
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for x in batches:
            reference.train()(x)
    for (name, a), b in zip(layer.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


# ---------------------------------------------------------------------------------------------
# batches as loaders yield them


def _stats(net):
    return [t.clone() for m in norms(net) for t in (m.running_mean, m.running_var)]


@pytest.mark.parametrize("wrap", [
    lambda x, i: x,
    lambda x, i: (x, torch.full((len(x),), i)),  # (images, pids)
    lambda x, i: [x, torch.zeros(len(x)), ["a.jpg"] * len(x)],
    lambda x, i: {"img": x, "pid": torch.zeros(len(x)), "camid": 0, "impath": []},  # torchreid
    lambda x, i: {"images": x, "targets": torch.zeros(len(x)), "camids": 0, "img_paths": []},  # fast-reid
], ids=["tensor", "tuple", "list", "torchreid-dict", "fastreid-dict"])
def test_batch_formats(wrap):
    batches = make_batches()
    plain = ra.recalibrate_norms(small_net(), batches)
    wrapped = ra.recalibrate_norms(small_net(), [wrap(x, i) for i, x in enumerate(batches)])
    for a, b in zip(_stats(plain), _stats(wrapped)):
        assert torch.equal(a, b)


def test_bad_batches_are_refused_and_nothing_changes():
    net = randomize(small_net())
    net.eval()
    stats = _stats(net)
    with pytest.raises(ValueError, match="recalibrate_norms got no batches"):
        ra.recalibrate_norms(net, [])
    with pytest.raises(ValueError, match="recalibrate_norms got no batches"):
        ra.recalibrate_norms(net, iter(()))
    with pytest.raises(ValueError, match="num_batches must be None .* or a positive int, got 0"):
        ra.recalibrate_norms(net, make_batches(), num_batches=0)
    with pytest.raises(ValueError, match=r"momentum must be None .* or a float in \(0, 1\], got 1.5"):
        ra.recalibrate_norms(net, make_batches(), momentum=1.5)
    with pytest.raises(KeyError,
                       match=r"batch 0 is a dict without an image entry.*\('img', 'images'\).*\['x'\]"):
        ra.recalibrate_norms(net, [{"x": make_batches()[0]}])
    # fails after a batch ran
    with pytest.raises(TypeError, match="batch 1 must be an image tensor.*got str"):
        ra.recalibrate_norms(net, [make_batches()[0], ("not an image",)])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ra.recalibrate_norms(lambda x: x, make_batches())
    assert all(torch.equal(a, b) for a, b in zip(_stats(net), stats))
    assert all(int(m.num_batches_tracked) == 0 for m in norms(net))
    assert not any(m.training for m in net.modules())
    assert [m.momentum for m in norms(net)] == [0.1] * 3


def test_sync_batchnorm_is_recalibrated_and_frozen_batchnorm_is_not():
    from torchvision.ops import FrozenBatchNorm2d

    batches = make_batches()
    plain = ra.recalibrate_norms(randomize(small_net()), batches)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(randomize(small_net()))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in sync.modules()) == 3
    ra.recalibrate_norms(sync, batches)  # without torch.distributed: torch's BatchNorm logic
    for a, b in zip(_stats(plain), _stats(sync)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    frozen = randomize(small_net())
    frozen[1] = FrozenBatchNorm2d(6).to(F64)
    frozen[1].running_mean.fill_(3.0)
    ra.recalibrate_norms(frozen, batches)
    assert torch.equal(frozen[1].running_mean, torch.full((6,), 3.0, dtype=F64))
    assert int(frozen[4].num_batches_tracked) == len(batches)  # the BatchNorms after it are


def test_a_model_without_batchnorm_is_returned_as_is():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    assert ra.recalibrate_norms(net, make_batches(dtype=torch.float32)) is net


# ---------------------------------------------------------------------------------------------
# the torchreid recipe of docs/training.md


def recipe_code() -> str:
    """The Python block of docs/training.md's "Evaluation during training" section."""
    text = (ROOT / "docs" / "training.md").read_text()
    section = text.split("## Evaluation during training", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert blocks, "no python block in docs/training.md's 'Evaluation during training' section"
    return blocks[0]


def test_the_recipe_runs_on_an_engine_like_object(monkeypatch):
    """torchreid's Engine.test(...) is called by Engine.run; the recipe's subclass re-estimates the
    statistics on the data manager's train_loader (10 batches) before the base class evaluates."""
    seen = {}

    class Engine:  # the parts of torchreid's engine the recipe touches
        def __init__(self, datamanager, model):
            self.datamanager, self.model = datamanager, model

        def test(self, dist_metric="euclidean", **kwargs):
            seen["counts"] = [int(m.num_batches_tracked) for m in norms(self.model)]
            seen["kwargs"] = dict(dist_metric=dist_metric, **kwargs)
            return 0.5

    fake = types.ModuleType("torchreid")
    fake.engine = types.SimpleNamespace(ImageSoftmaxEngine=Engine, ImageTripletEngine=Engine)
    monkeypatch.setitem(sys.modules, "torchreid", fake)
    namespace = {}
    exec(compile(recipe_code(), "docs/training.md", "exec"), namespace)  # noqa: S102
    engine_class = next(v for k, v in namespace.items() if isinstance(v, type) and issubclass(v, Engine))
    model = small_net(torch.float32)
    loader = [{"img": x.float(), "pid": torch.zeros(5)} for x in make_batches(count=12)]
    engine = engine_class(types.SimpleNamespace(train_loader=loader), model)
    assert engine.test(dist_metric="cosine", ranks=[1]) == 0.5
    assert seen == {"counts": [10, 10, 10], "kwargs": {"dist_metric": "cosine", "ranks": [1]}}
    assert model.training  # the mode the engine left it in


def _reid_data():
    try:
        return importlib.import_module("reid_data")
    except ImportError:  # not yet on sys.path: the integration tests' helper, by its path
        spec = importlib.util.spec_from_file_location("reid_data",
                                                      ROOT / "tests" / "integrations" / "reid_data.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["reid_data"] = module
        spec.loader.exec_module(module)
        return module


@pytest.mark.slow
def test_the_recipe_runs_in_torchreids_engine(tmp_path, capsys):
    """The recipe's engine trains one epoch on the synthetic Market-1501 of the integration tests
    with torchreid's ImageSoftmaxEngine, re-estimates the statistics before torchreid's own test
    and evaluator, and saves the recalibrated statistics in the checkpoint."""
    pytest.importorskip("torchreid")
    import torchreid

    from reid_attention.integrations import torchreid as rt

    reid_data = _reid_data()
    data = reid_data.make_market1501(tmp_path / "data")
    name = "ra_recalibrate_synthetic_market1501"

    class Synthetic(torchreid.data.ImageDataset):
        def __init__(self, root="", **kwargs):
            train = reid_data.read_split(data.train_dir, relabel=True)
            super().__init__(train, reid_data.read_split(data.query_dir),
                             reid_data.read_split(data.gallery_dir), **kwargs)

    try:
        torchreid.data.register_image_dataset(name, Synthetic)
    except ValueError:  # registered earlier in this session
        pass
    rt.register_models(["resnet18_rga_s"], input_size=data.size)
    namespace = {}
    exec(compile(recipe_code(), "docs/training.md", "exec"), namespace)  # noqa: S102
    engine_class = namespace["RecalibratingEngine"]
    assert issubclass(engine_class, torchreid.engine.ImageSoftmaxEngine)

    torchreid.utils.set_random_seed(0)
    datamanager = torchreid.data.ImageDataManager(
        root=str(data.root), sources=name, height=data.size[0], width=data.size[1], batch_size_train=16,
        batch_size_test=32, workers=0, use_gpu=False, transforms=["random_flip"])
    model = torchreid.models.build_model("resnet18_rga_s", datamanager.num_train_pids, pretrained=False,
                                         use_gpu=False)
    optimizer = torchreid.optim.build_optimizer(model, optim="adam", lr=3e-4)
    scheduler = torchreid.optim.build_lr_scheduler(optimizer, lr_scheduler="single_step", stepsize=20)
    engine = engine_class(datamanager, model, optimizer, scheduler=scheduler, use_gpu=False)
    engine.run(save_dir=str(tmp_path / "log"), max_epoch=1, eval_freq=1, print_freq=10)
    out = capsys.readouterr().out
    assert re.search(r"mAP: [\d.]+%", out) and re.search(r"Rank-1\s*:\s*[\d.]+%", out), out[-2000:]
    batches = len(datamanager.train_loader)  # 64 images / 16: 4 < 10, all of them
    counts = {int(m.num_batches_tracked) for m in norms(model)}
    assert counts == {min(10, batches)}, counts  # reset, then one count per recalibration batch
    checkpoint = rt.load_checkpoint(tmp_path / "log" / "model" / "model.pth.tar-1")
    saved = checkpoint["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key


def test_recipe_code_is_short():
    lines = [line for line in recipe_code().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) <= 8, lines
    assert "ra.recalibrate_norms(self.model, self.datamanager.train_loader, num_batches=10)" in recipe_code()


def test_exported():
    module = importlib.import_module("reid_attention.recalibrate")
    assert ra.recalibrate_norms is module.recalibrate_norms and "recalibrate_norms" in ra.__all__
    assert module.IMAGE_KEYS == ("img", "images")
