"""Containers keep their sequence conventions after insertion (Grad-CAM, feature extraction).

After ``insert_attention`` every container of the model (``nn.Sequential``, ``nn.ModuleList``,
``nn.ModuleDict``) has the length, iteration, indexing, slices and keys of the plain model, with
the same child objects: ``model.layer4[-1]`` is the last block (the usual Grad-CAM target, whose
output is the map *before* the attention), while the attention stays a real child
(``layer4.attention.*`` keys), runs after its site, and is seen by torch.fx
(``create_feature_extractor(model, {"layer4": ...})`` returns the map *after* it).

The families are those of test_insert.py: structure on the meta device for all of them, numerics
(Grad-CAM hooks, same function) on the small real models.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision.models as tvm
from insertion_checks import FAMILIES as INSERT_FAMILIES
from insertion_checks import inserted
from real_models import REAL
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.resnet import BasicBlock, Bottleneck

import reid_attention as ra
from reid_attention._swapped import AttentionSequential
from reid_attention.insert import fx_leaf_modules

# test_insert.py's families; the Inception models' auxiliary heads (a tuple in training mode) off
FAMILIES = {
    name: (builder, {**kwargs, "aux_logits": False} if name in ("googlenet", "inception") else kwargs, size)
    for name, (builder, kwargs, size, _) in INSERT_FAMILIES.items()
}


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
SLICES = (slice(None), slice(1, None), slice(None, -1), slice(None, None, 2), slice(-2, None), slice(3, 1))


class Scale(nn.Module):
    """Test attention: x * factor (traceable by torch.fx, unlike the library's layers)."""

    def __init__(self, channels: int, feat_size, factor: float = 2.0) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))

    def forward(self, x):
        return x * self.factor


def scale_by(factor: float):
    return lambda channels, feat_size: Scale(channels, feat_size, factor)


def on_meta(builder, **kwargs) -> nn.Module:
    if builder is tvm.regnet_y_400mf:  # computes widths from data
        return builder(weights=None, **kwargs).to("meta").eval()
    with torch.device("meta"):
        return builder(weights=None, **kwargs).eval()


def plain_type(module: nn.Module) -> type:
    """The module's class before insertion swapped it (for the mixin subclasses), else its class."""
    return getattr(type(module), "_site_base", type(module))


def ids(modules) -> list:
    return [id(m) for m in modules]


def sequence_view(container: nn.Module) -> dict:
    """What the sequence protocol of a container shows: length, children (by identity), types,
    every index, slices (children by identity) and keys."""
    view = {"len": len(container), "iter": ids(container), "types": [plain_type(m) for m in container]}
    if isinstance(container, nn.ModuleDict):
        view["keys"] = list(container.keys())
        view["items"] = [(k, id(m)) for k, m in container.items()]
        return view
    n = len(container)
    view["index"] = [id(container[i]) for i in range(-n, n)]
    if isinstance(container, nn.Sequential):
        view["slices"] = []
        for s in SLICES:
            try:
                part = container[s]
            except TypeError as err:  # a subclass that cannot be built from an OrderedDict (AnyStage)
                view["slices"].append(type(err))
            else:
                view["slices"].append((len(part), ids(part)))
    return view


def containers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, CONTAINERS)}


# --------------------------------------------------------------------------- structure, every family


@pytest.mark.filterwarnings("ignore:.*meta parameter")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_containers_keep_len_indexing_iteration_and_keys(family):
    builder, kwargs, size = FAMILIES[family]
    model = on_meta(builder, **kwargs)
    before = {name: (m, type(m), sequence_view(m)) for name, m in containers(model).items()}
    keys = list(model.state_dict())
    ra.insert_attention(model, "apnet_c", input_size=size)
    after = containers(model)
    for name, (container, cls, view) in before.items():
        assert after[name] is container and isinstance(container, cls), name  # maybe a subclass now
        assert sequence_view(container) == view, name
    holders = [m for m in after.values() if isinstance(m, AttentionSequential)]
    # The attention is still a real child: in _modules, children() and the state_dict, with its key.
    for site, module in inserted(model).items():
        assert any(module is child for child in model.modules()), site
    state = list(model.state_dict())
    assert [k for k in state if k in set(keys)] == keys  # every original key, in its order
    assert all(".attention." in k or "_attention." in k for k in set(state) - set(keys))
    if family in ("resnet50", "resnext50"):
        assert [type(h).__name__ for h in holders] == ["SequentialWithAttention"] * 4
        assert len(model.layer4) == 3 and isinstance(model.layer4[-1], Bottleneck)
        assert [n for n, _ in model.layer4.named_children()] == ["0", "1", "2", "attention"]
        assert "layer4.attention.se.fc.0.weight" in state


def test_slices_and_types_of_a_stage():
    model = tvm.resnet18(weights=None).eval()
    blocks = list(model.layer4)
    ra.insert_attention(model, scale_by(2.0), sites=["layer4"], input_size=(64, 32))
    assert len(model.layer4) == 2 and list(model.layer4) == blocks
    assert model.layer4[-1] is blocks[-1] and model.layer4[0] is blocks[0]
    assert (isinstance(model.layer4, nn.Sequential)
            and type(model.layer4).__name__ == "SequentialWithAttention")
    whole = model.layer4[:]  # the blocks, as in the plain model: the stage's attention is in no slice
    assert type(whole) is nn.Sequential and list(whole._modules) == ["0", "1"]
    assert model.layer4.attention not in model.layer4 and blocks[1] in model.layer4
    assert [n for n, _ in model.layer4.named_children()] == ["0", "1", "attention"]
    with pytest.raises(IndexError):
        model.layer4[2]
    with pytest.raises(TypeError):
        model.layer4["attention"]
    assert type(model.layer4 + nn.Sequential(nn.Identity())) is nn.Sequential
    assert len(model.layer4 + nn.Sequential(nn.Identity())) == 3 and len(model.layer4 * 2) == 4


# --------------------------------------------------------------------------- Grad-CAM, every family


def _holder_and_target(model: nn.Module, site: str):
    """The container holding the attention inserted after ``site`` and the child whose output the
    attention takes (``container[-1]`` for a stage, ``parent[i]`` = the site for a sibling), or
    (None, None) where the site's own class was swapped (no child gives the pre-attention map)."""
    module = model.get_submodule(site)
    if isinstance(module, AttentionSequential) and module._output_key is not None:
        return module, module[-1]
    parent = model.get_submodule(site.rpartition(".")[0])
    if isinstance(parent, AttentionSequential) and f"{site.rpartition('.')[2]}_attention" in parent._modules:
        return parent, parent[list(parent).index(module)]
    return None, None


@pytest.mark.parametrize("family", sorted(REAL))
def test_grad_cam_target_sees_the_block_output(family, monkeypatch):
    """A pytorch-grad-cam-style hook (forward hook + tensor hook for the gradient) on
    ``container[-1]`` captures the block's output, which is the attention's input (not its output:
    the attention doubles it), the same map as the plain model's ``container[-1]``; the model
    computes what "the attention after each site" computes (the plain model with the attention
    applied by a forward hook on each site)."""
    if family == "densenet":  # oneDNN is slow on DenseNet's many small convolutions (test_insert.py)
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    make, size = REAL[family]
    torch.manual_seed(0)
    model = make().eval()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, *size)
    ra.insert_attention(model, scale_by(2.0), input_size=size)
    attention = inserted(model)

    # The same function: the plain model with each attention applied after its site by a hook.
    targets, plain_maps, captured = {}, {}, {}
    for site, module in attention.items():
        plain.get_submodule(site).register_forward_hook(lambda m, args, out, att=module: att(out))
        holder, target = _holder_and_target(model, site)
        if target is not None:
            targets[site] = target
            plain_target = plain.get_submodule(site)
            plain_target = plain_target[-1] if holder is model.get_submodule(site) else plain_target
            plain_target.register_forward_hook(  # runs before the hook that applies the attention
                lambda m, a, out, site=site: plain_maps.update({site: out}), prepend=True)
    with torch.no_grad():
        reference = plain(x)
    if family in ("resnet18", "resnext"):
        assert ([targets[f"layer{i}"] is model.get_submodule(f"layer{i}")[-1] for i in (1, 2, 3, 4)]
                == [True] * 4)
    assert targets or family == "googlenet", "no container site"  # GoogLeNet's sites are swapped modules

    for site, target in targets.items():

        def grad_cam_hook(m, args, out, site=site):  # what pytorch-grad-cam's ActivationsAndGradients does
            captured[site] = {"activation": out.detach()}
            out.register_hook(lambda grad: captured[site].update(gradient=grad))

        def attention_hook(m, args, out, site=site):
            captured[f"{site}:attention"] = {"input": args[0].detach(), "output": out.detach()}
            out.register_hook(lambda grad: captured[f"{site}:attention"].update(gradient=grad))

        target.register_forward_hook(grad_cam_hook)
        attention[site].register_forward_hook(attention_hook)
    out = model(x)
    torch.testing.assert_close(out.detach(), reference, rtol=0, atol=0)
    out.square().mean().backward()
    for site in targets:
        block, att = captured[site], captured[f"{site}:attention"]
        torch.testing.assert_close(block["activation"], att["input"], rtol=0, atol=0)
        torch.testing.assert_close(block["activation"], plain_maps[site], rtol=0, atol=0)
        torch.testing.assert_close(2 * block["activation"], att["output"], rtol=0, atol=0)
        torch.testing.assert_close(block["gradient"], 2 * att["gradient"])  # through the attention


# --------------------------------------------------------------------------- feature extraction


def test_create_feature_extractor_returns_the_post_attention_map():
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    ra.insert_attention(model, scale_by(2.0), sites=["layer3", "layer4"], input_size=(64, 32))
    x = torch.randn(2, 3, 64, 32)
    extractor = create_feature_extractor(model, {"layer4": "stage", "layer4.1": "block", "fc": "logits"})
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["stage"], 2 * out["block"], rtol=0, atol=0)  # after the attention
        torch.testing.assert_close(out["logits"], model(x))
    assert "layer4.attention.factor" in {n.target for n in extractor.graph.nodes if n.op == "get_attr"}


def test_create_feature_extractor_with_the_library_layers():
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    ra.insert_attention(model, "rga_s", sites=["layer4"], input_size=(64, 32))
    x = torch.randn(2, 3, 64, 32)
    leaves = {"leaf_modules": fx_leaf_modules(model)}
    extractor = create_feature_extractor(model, {"layer4": "stage", "layer4.1": "block"},
                                         tracer_kwargs=leaves)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["stage"], model.layer4.attention(out["block"]))


# --------------------------------------------------------------------------- a sibling placement


class Block(nn.ModuleDict):
    """Runs its own children (like DenseNet's dense blocks): attention joins its parent."""

    def forward(self, x):
        for module in self.values():
            x = module(x)
        return x


def sibling_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4, padding=1),
        Block({"a": nn.Conv2d(8, 8, 1), "b": nn.ReLU()}),
        nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 8, 1),
    ).eval()


def test_sibling_attention_keeps_the_parent_indices():
    model = sibling_model()
    children = list(model)
    ra.insert_attention(model, scale_by(2.0), sites=["1"], input_size=(32, 32))
    assert list(model._modules) == ["0", "1", "1_attention", "2", "3"]
    assert len(model) == 4 and list(model) == children and model[-1] is children[-1]
    assert model[2] is children[2] and list(model[1].keys()) == ["a", "b"]
    # A slice carries the attention of the children it holds, with its key; the others are plain.
    part = model[1:3]
    assert list(part._modules) == ["1", "1_attention", "2"] and len(part) == 2 and list(part) == children[1:3]
    assert type(model[2:]) is nn.Sequential and list(model[2:]._modules) == ["2", "3"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(part(model[0](x)), model[2](2 * model[1](model[0](x))))
        torch.testing.assert_close(model[:](x), model(x))


def test_edits_keep_the_attention_in_place():
    model = sibling_model()
    children = list(model)
    ra.insert_attention(model, scale_by(2.0), sites=["1"], input_size=(32, 32))
    extra = nn.Identity()
    model.insert(2, extra)
    assert list(model._modules) == ["0", "1", "1_attention", "2", "3", "4"] and model[2] is extra
    model[1] = children[1]  # assignment: in place, the attention stays after it
    assert list(model._modules) == ["0", "1", "1_attention", "2", "3", "4"]
    assert model.pop(2) is extra and list(model) == children
    model.append(extra)
    assert list(model._modules)[-1] == "4" and model[-1] is extra
    del model[-1]
    model += nn.Sequential(extra)
    assert model[-1] is extra and len(model) == 5
    del model[1]  # the site goes: its attention follows the child before it
    assert list(model._modules) == ["0", "1_attention", "1", "2", "3"]

    stage = tvm.resnet18(weights=None).eval()
    blocks = list(stage.layer1)
    ra.insert_attention(stage, scale_by(2.0), sites=["layer1"], input_size=(64, 32))
    block = BasicBlock(64, 64)
    stage.layer1.append(block)  # a new block goes before the stage's attention
    assert list(stage.layer1._modules) == ["0", "1", "2", "attention"] and stage.layer1[-1] is block
    stage.layer1.extend([nn.Identity()])
    stage.layer1 *= 1
    assert list(stage.layer1._modules)[-1] == "attention" and len(stage.layer1) == 4
    del stage.layer1[2:]
    assert list(stage.layer1) == blocks and list(stage.layer1._modules) == ["0", "1", "attention"]
    x = torch.randn(2, 64, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(stage.layer1(x), 2 * blocks[1](blocks[0](x)))


# --------------------------------------------------------------------------- copies and tracing


def test_copies_keep_the_containers():
    model = sibling_model()
    ra.insert_attention(model, scale_by(2.0), sites=["1", "2"], input_size=(32, 32))
    stage = tvm.resnet18(weights=None).eval()
    ra.insert_attention(stage, "apnet_c", sites=["layer1", "maxpool"], input_size=(64, 32))
    for net, x in ((model, torch.randn(2, 3, 32, 32)), (stage, torch.randn(2, 3, 64, 32))):
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        with torch.no_grad():
            expected = net(x)
            for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net)),
                          torch.load(buffer, weights_only=False)):
                assert list(clone.state_dict()) == list(net.state_dict())
                for (name, a), b in zip(containers(net).items(), containers(clone).values()):
                    assert (type(a) is type(b) and len(a) == len(b)
                            and list(a._modules) == list(b._modules)), name
                torch.testing.assert_close(clone(x), expected)
    assert len(stage.layer1) == 2 and "layer1.attention.se.fc.0.weight" in stage.state_dict()


def test_torch_compile_fullgraph_runs_the_attention():
    model = sibling_model()
    ra.insert_attention(model, scale_by(2.0), sites=["1"], input_size=(32, 32))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        torch.testing.assert_close(model(x), model[3](model[2](2 * model[1](model[0](x)))))
