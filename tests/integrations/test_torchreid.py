"""deep-person-reid (torchreid) end to end: our models registered in its factory, trained for one
epoch by its engines on the synthetic Market-1501 (reid_data.py) and evaluated by its own
evaluator; the factory contract; ImageNet weights from the local cache only; checkpoints on
torch >= 2.6. Skipped where torchreid is not installed (``make test-integrations`` installs it).

Images are 64x32 (the models are registered for that size), batches 16, ``workers=0``: each
engine test takes a few seconds to ~30 s on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
import subprocess
import sys

import pytest
import torch
from reid_data import read_split

import reid_attention as ra
from reid_attention.integrations import torchreid as rt

SIZE = (64, 32)
DATASET = "ra_synthetic_market1501"


@pytest.fixture(scope="module")
def torchreid():
    """torchreid with our models registered for SIZE and the synthetic data set as DATASET."""
    torchreid = pytest.importorskip("torchreid")
    rt.register_models(input_size=SIZE)

    class SyntheticMarket1501(torchreid.data.ImageDataset):
        """The reid_data.py layout under ``root`` (train pids relabelled, as torchreid expects)."""

        def __init__(self, root="", **kwargs):
            data_dir = f"{root}/market1501/Market-1501-v15.09.15"
            train = read_split(f"{data_dir}/bounding_box_train", relabel=True)
            query = read_split(f"{data_dir}/query")
            gallery = read_split(f"{data_dir}/bounding_box_test")
            super().__init__(train, query, gallery, **kwargs)

    try:
        torchreid.data.register_image_dataset(DATASET, SyntheticMarket1501)
    except ValueError:  # registered by an earlier module of this session
        pass
    return torchreid


def data_manager(torchreid, market1501, sampler="RandomSampler"):
    return torchreid.data.ImageDataManager(
        root=str(market1501.root), sources=DATASET, height=SIZE[0], width=SIZE[1],
        transforms=["random_flip"], batch_size_train=16, batch_size_test=32, workers=0,
        use_gpu=False, train_sampler=sampler, num_instances=4,
    )


def train_and_evaluate(torchreid, market1501, tmp_path, capsys, name, loss="softmax"):
    """One epoch with torchreid's engine for ``loss``, then its final test (CMC and mAP printed by
    torchreid's evaluator) and checkpoint; returns (model, datamanager, checkpoint, rank1, mAP)."""
    triplet = loss == "triplet"
    torchreid.utils.set_random_seed(0)  # python, numpy and torch: the same batches, flips and weights
    datamanager = data_manager(torchreid, market1501, "RandomIdentitySampler" if triplet else "RandomSampler")
    model = torchreid.models.build_model(name, num_classes=datamanager.num_train_pids, loss=loss,
                                         pretrained=False, use_gpu=False)
    optimizer = torchreid.optim.build_optimizer(model, optim="adam", lr=3e-4)
    scheduler = torchreid.optim.build_lr_scheduler(optimizer, lr_scheduler="single_step", stepsize=20)
    if triplet:
        engine = torchreid.engine.ImageTripletEngine(datamanager, model, optimizer, margin=0.3,
                                                     scheduler=scheduler, use_gpu=False)
    else:
        engine = torchreid.engine.ImageSoftmaxEngine(datamanager, model, optimizer, scheduler=scheduler,
                                                     use_gpu=False)
    engine.run(save_dir=str(tmp_path), max_epoch=1, print_freq=2)
    out = capsys.readouterr().out
    printed_rank1 = re.search(r"Rank-1\s*:\s*([\d.]+)%", out)
    printed_map = re.search(r"mAP: ([\d.]+)%", out)
    assert printed_rank1 and printed_map, out[-2000:]
    assert "epoch: [1/1]" in out, out[-2000:]
    # the final test's rank-1, as torchreid's Engine.test returned it, saved in the checkpoint
    checkpoint = rt.load_checkpoint(tmp_path / "model" / "model.pth.tar-1")
    rank1 = checkpoint["rank1"]
    assert isinstance(float(rank1), float) and 0.0 <= rank1 <= 1.0
    assert abs(100 * float(rank1) - float(printed_rank1.group(1))) <= 0.051
    cmc = ", ".join(f"rank-{r} {v}%" for r, v in re.findall(r"Rank-(\d+)\s*:\s*([\d.]+)%", out))
    with capsys.disabled():
        print(f"\n[torchreid] {name} loss={loss}: 1 epoch; torchreid's evaluator: "
              f"mAP {printed_map.group(1)}%, {cmc}")
    return model, datamanager, checkpoint


@pytest.mark.slow
def test_softmax_engine_trains_and_evaluates_a_preset(torchreid, market1501, tmp_path, capsys):
    model, datamanager, checkpoint = train_and_evaluate(torchreid, market1501, tmp_path, capsys,
                                                        "rga_resnet50")
    # the checkpoint torchreid wrote loads into a fresh model: same eval features
    fresh = torchreid.models.build_model("rga_resnet50", datamanager.num_train_pids, pretrained=False)
    fresh.load_state_dict(checkpoint["state_dict"])
    images = next(iter(datamanager.test_loader[DATASET]["query"]))["img"][:4]
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images))
    assert checkpoint["epoch"] == 1 and "optimizer" in checkpoint and "scheduler" in checkpoint


@pytest.mark.slow
def test_softmax_engine_trains_and_evaluates_a_torchvision_backbone(torchreid, market1501, tmp_path, capsys):
    train_and_evaluate(torchreid, market1501, tmp_path, capsys, "resnet18_rga_s")


@pytest.mark.slow
def test_triplet_engine_trains_and_evaluates(torchreid, market1501, tmp_path, capsys):
    train_and_evaluate(torchreid, market1501, tmp_path, capsys, "resnet18_apnet_c", loss="triplet")


def test_torchreids_builtin_market1501_reads_the_synthetic_layout(torchreid, market1501):
    from torchreid.reid.data.datasets.image.market1501 import Market1501

    dataset = Market1501(root=str(market1501.root), mode="query", verbose=False)
    assert len(dataset.train) == len(market1501.split("train")) == 64
    assert len(dataset.query) == len(market1501.split("query")) == 16
    assert len(dataset.gallery) == len(market1501.split("gallery")) == 48
    assert dataset.num_train_pids == market1501.num_train_ids and dataset.num_train_cams == 2


# ---------------------------------------------------------------------------------------------
# the factory contract


@pytest.mark.parametrize("kind", sorted(ra.list_attentions()))
def test_factory_contract_for_every_kind(torchreid, kind):
    model = torchreid.models.build_model(f"resnet18_{kind}", num_classes=5, loss="softmax", pretrained=False,
                                         use_gpu=False)
    images = torch.randn(4, 3, *SIZE)
    assert model(images).shape == (4, 5)  # training: logits
    model.loss = "triplet"
    logits, features = model(images)
    assert logits.shape == (4, 5) and features.shape == (4, 512)
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (4, 512)  # eval: the BNNeck features
    parameters = dict(model.named_parameters())
    assert "classifier.weight" in parameters and "bnneck.weight" in parameters
    assert "bnneck.bias" not in parameters and "bnneck.bias" in model.state_dict()  # fixed at zero


@pytest.mark.parametrize("name", list(rt.PRESETS))
def test_every_preset_builds_in_the_factory(torchreid, name):
    model = torchreid.models.build_model(name, num_classes=3, loss="triplet", pretrained=False, use_gpu=False)
    assert model.feature_dim == 2048 and model.loss == "triplet"
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *SIZE)).shape == (2, 2048)


def test_registered_names(torchreid):
    factory = vars(torchreid.models)["__model_factory"]
    for name in ("rga_resnet50", "rga_s_resnet50", "apnet_resnet50", "apnet_s_resnet50", "resnet50_rga_sc",
                 "resnet50_pfsa", "resnet101_apnet_c", "wide_resnet50_2_rga_c", "mobilenet_v3_small_apnet_s"):
        assert name in factory, name
    assert "resnet50" in factory and "osnet_x1_0" in factory  # torchreid's own models are still there
    assert rt.parse_name("wide_resnet50_2_rga_sc") == ("wide_resnet50_2", "rga_sc")
    assert rt.parse_name("resnet50_rga_s") == ("resnet50", "rga_s")
    with pytest.raises(ValueError, match=r"unknown model 'resnet50_se'.*e\.g\. 'resnet50_rga_sc'"):
        rt.register_models(["resnet50_se"])
    with pytest.raises(KeyError, match="Unknown model"):  # torchreid's message for a name nobody registered
        torchreid.models.build_model("nonet_rga_sc", 3)


def test_a_name_torchreid_owns_is_not_replaced(torchreid, monkeypatch):
    factory = vars(torchreid.models)["__model_factory"]
    monkeypatch.setitem(factory, "resnet18_pfsa", factory["resnet18"])
    with pytest.raises(ValueError, match=r"torchreid already has models named \['resnet18_pfsa'\]"):
        rt.register_models(["resnet18_pfsa"])


def test_input_size_is_the_registered_one(torchreid):
    model = torchreid.models.build_model("resnet18_rga_sc", num_classes=3, pretrained=False).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(16, 8\)|16x8"):
        model(torch.randn(2, 3, 128, 64))  # built for 64x32 images: layer1's 16x8 map
    # a direct factory call may name another size
    model = vars(torchreid.models)["__model_factory"]["resnet18_rga_sc"](3, pretrained=False,
                                                                         input_size=(128, 64))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 128, 64)).shape == (2, 512)


def test_unknown_loss_is_refused(torchreid):
    with pytest.raises(ValueError, match=r"loss must be one of \('softmax', 'triplet'\).*got 'arcface'"):
        torchreid.models.build_model("resnet18_pfsa", 3, loss="arcface", pretrained=False)


# ---------------------------------------------------------------------------------------------
# pretrained: the local torch hub cache only


def test_pretrained_reads_the_local_cache_and_never_downloads(torchreid, tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights, resnet18

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pretrained=True reads the ImageNet weights of resnet18"):
        torchreid.models.build_model("resnet18_pfsa", 3, pretrained=True)

    cached = tmp_path / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(7)
    imagenet = resnet18().state_dict()  # stands in for the ImageNet file
    torch.save(imagenet, cached)
    model = torchreid.models.build_model("resnet18_pfsa", 3, pretrained=True)
    backbone = model.backbone.body.state_dict()
    assert all(torch.equal(backbone[k], imagenet[k]) for k in backbone if k in imagenet)
    assert len([k for k in backbone if k in imagenet]) == len(imagenet) - 2  # all but fc.weight, fc.bias


# ---------------------------------------------------------------------------------------------
# checkpoints


class NotATensor:
    """Pickled as a class reference: only a full unpickle can rebuild it."""


def test_checkpoint_round_trip(torchreid, tmp_path):
    import numpy as np

    model = torchreid.models.build_model("resnet18_pfsa", 3, pretrained=False)
    optimizer = torchreid.optim.build_optimizer(model, optim="adam", lr=3e-4)
    state = {"state_dict": model.state_dict(), "epoch": 3, "rank1": np.float32(0.625),
             "optimizer": optimizer.state_dict()}
    torchreid.utils.save_checkpoint(state, str(tmp_path))
    path = tmp_path / "model.pth.tar-3"

    loaded = rt.load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["rank1"] == np.float32(0.625)
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in model.state_dict().items())
    fresh = torchreid.models.build_model("resnet18_pfsa", 3, pretrained=False)
    fresh.load_state_dict(loaded["state_dict"])
    optimizer.load_state_dict(loaded["optimizer"])

    if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6):
        # why the helper exists: torchreid's own loader uses torch.load's weights_only=True default
        with pytest.raises(pickle.UnpicklingError):
            torchreid.utils.load_checkpoint(str(path))


def test_checkpoint_with_other_objects_needs_trusted(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"epoch": 1, "extra": NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"odd\.pth holds more than tensors.*trusted=True"):
        rt.load_checkpoint(path)
    assert isinstance(rt.load_checkpoint(path, trusted=True)["extra"], NotATensor)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        rt.load_checkpoint(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------
# without the extra


@pytest.mark.parametrize("hidden, package", [("torchreid", "torchreid"), ("scipy", "scipy")])
def test_missing_extra_is_one_line(hidden, package):
    if hidden != "torchreid" and importlib.util.find_spec("torchreid") is None:
        pytest.skip("a missing torchreid dependency shows only where torchreid is installed")
    code = (f"import sys, json\nsys.modules[{hidden!r}] = None\n"
            "from reid_attention.integrations.torchreid import register_models\n"
            "from reid_attention._extras import MissingExtraError\n"
            "try:\n    register_models()\n"
            "except MissingExtraError as err:\n    print(json.dumps([err.name, str(err)]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    name, message = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == package
    assert message.startswith(f"reid_attention.integrations.torchreid.register_models needs {package}")
    assert message.endswith('pip install "reid-attention[torchreid]"') and "\n" not in message
