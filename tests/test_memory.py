"""``memory="lean"``: everything after the projection GEMMs recomputed in backward, the relation
embedding walked in batch chunks (never held whole, in training or inference); and the fused
RGA-SC's spatially gated map never kept for backward (either mode).

Same outputs, gradients and BatchNorm statistics (counted once) as the default, in float64;
fewer bytes kept for backward (counted with saved-tensor hooks, not timed); norms that are not
exact BatchNorms keep the default path (a module must not run twice).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import (
    ROUNDING_FACTOR,
    STEP_TOL,
    U64,
    assert_same_step,
    max_abs,
    randomize_bn,
    rounding_envelope,
    run_step,
)
from torch import nn

import reid_attention as ra
from reid_attention._relation import fused
from reid_attention._relation import lean as embedding

SIZE_TIED = ["rga_s", "rga_c", "rga_sc", "apnet_s"]


def build(kind: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(ra.create_attention(kind, 32, feat_size=(8, 4), **kw).double())


def x_(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 32, 8, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(params=["whole", "per_sample"])
def chunks(request, monkeypatch):
    """The lean embedding's batch in one chunk, or one chunk per sample."""
    if request.param == "per_sample":
        monkeypatch.setattr(embedding, "CHUNK_ELEMENTS", 1)
    return request.param


@pytest.mark.parametrize("kind", SIZE_TIED)
@pytest.mark.parametrize("train", [True, False])
def test_lean_equals_default(kind, train, chunks):
    default = build(kind).train(train)
    lean = copy.deepcopy(default)
    lean.memory = "lean"
    for seed in range(2):  # twice: the statistics move between steps
        assert_same_step(run_step(default, x_(seed)), run_step(lean, x_(seed)))


@pytest.fixture
def inference_calls(monkeypatch):
    """The calls of the lean form's inference embedding, recorded."""
    calls = []
    original = embedding.inference_embedding
    monkeypatch.setattr(embedding, "inference_embedding", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("kind", SIZE_TIED)
@pytest.mark.parametrize("train", [True, False])
def test_lean_inference_equals_full(kind, train, chunks, inference_calls):
    """Without a gradient the lean form runs the embedding in chunks only, keeping and
    recomputing nothing: the full form's outputs and running statistics (float64, STEP_TOL: the
    lean vs default comparisons), with batch statistics (train mode) or running ones (eval)."""
    full = build(kind).train(train)
    full.memory = "full"
    lean = copy.deepcopy(full)
    lean.memory = "lean"
    with torch.no_grad():
        for seed in range(2):  # twice: in train mode the statistics move between calls
            torch.testing.assert_close(lean(x_(seed)), full(x_(seed)), **STEP_TOL)
    for (name, want), got in zip(full.named_buffers(), lean.buffers()):
        torch.testing.assert_close(got, want, **STEP_TOL, msg=name)
    assert inference_calls


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="is_exporting: torch 2.6+")
@pytest.mark.parametrize("kind", ["rga_sc", "apnet_s"])
def test_lean_inference_records_the_full_form(kind, inference_calls):
    """An exported (dynamic batch) or traced lean module records the full form, whose GEMMs take
    any batch, not the chunk loop; eager calls keep the lean form. Same outputs (float64)."""
    module = build(kind, memory="lean").eval()
    with torch.no_grad():
        program = torch.export.export(module, (x_(),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        with warnings.catch_warnings():  # torch.jit.trace: deprecated (FutureWarning), TracerWarnings
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, (x_(),), check_trace=False)
    assert not inference_calls
    x = torch.cat([x_(), x_(1)])[:5]
    with torch.no_grad():
        eager = module(x)
        assert inference_calls
        torch.testing.assert_close(program.module()(x), eager, **STEP_TOL)
        torch.testing.assert_close(traced(x[:3]), module(x[:3]), **STEP_TOL)


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.requires_grad_())
    return sum(storages.values())


@pytest.mark.parametrize("kind", SIZE_TIED)
def test_lean_keeps_fewer_bytes_for_backward(kind):
    x = torch.rand(4, 64, 16, 8)
    torch.manual_seed(0)
    default = ra.create_attention(kind, 64, feat_size=(16, 8)).train()
    lean = copy.deepcopy(default)
    lean.memory = "lean"
    agents = default.agents() if kind == "apnet_s" else [default]
    # at least one (B, n/s, n) float32 embedding per agent and axis is not kept
    embedding = sum(4 * 4 * w.tokens * n for a in agents for w, n in _axes(a))
    assert _saved_bytes(lean, x.clone()) <= _saved_bytes(default, x.clone()) - embedding


def _axes(agent):
    """(widths, tokens) of each axis of an RGA agent."""
    positions = agent.feat_size[0] * agent.feat_size[1]
    return [(w, positions if axis == "spatial" else agent.channels) for axis, w in agent.widths.items()]


def test_lean_with_sync_batchnorm_runs_each_norm_once():
    module = nn.SyncBatchNorm.convert_sync_batchnorm(build("rga_sc", memory="lean"))
    calls = []
    for m in module.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.register_forward_hook(lambda mod, args, out: calls.append(mod))
    module(x_()).sum().backward()
    assert len(calls) == len({id(m) for m in calls}) == sum(
        isinstance(m, nn.SyncBatchNorm) for m in module.modules())


def test_memory_validation_and_no_grad():
    with pytest.raises(ValueError, match="memory must be one of \\('auto', 'full', 'lean'\\), got 'small'"):
        ra.RGA(8, (4, 4), memory="small")
    m = ra.APNetS(8, (4, 4), memory="lean")
    with torch.no_grad():
        assert m(torch.rand(2, 8, 4, 4)).shape == (2, 8, 4, 4)
    with pytest.raises(ValueError, match="memory must be one of"):
        m.memory = None


def test_lean_with_stripes_whose_norms_differ_takes_the_default_path():
    """APNet-S stripes normalised one by one (different eps): no recomputation, same step."""
    default = build("apnet_s").train()
    default.levels[1][1].gg_spatial[1].eps = 1e-3
    lean = copy.deepcopy(default)
    lean.memory = "lean"
    assert_same_step(run_step(default, x_()), run_step(lean, x_()))


@pytest.mark.parametrize("memory", ["full", "lean"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rga_sc_keeps_no_gated_map_for_backward(memory, channels_last):
    """Of the full-size maps only the input is kept: y1 = x * s1 is recomputed in backward."""
    torch.manual_seed(0)
    module = ra.RGA(16, (8, 8), memory=memory).train()
    x = torch.rand(4, 16, 8, 8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    full = []

    def pack(t):
        if t.numel() == x.numel() and t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            full.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    assert full == []


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rga_sc_gated_functions_gradcheck(channels_last, chunked, monkeypatch):
    """The two autograd Functions behind the unstored gated map, checked numerically; ``chunked``:
    the projection's backward one sample per chunk (at the paper's sites a chunk is 8 samples of
    layer 1, so the suite's small maps would otherwise never take more than one)."""
    from reid_attention._relation import DoubleGate, GatedChannelProjection, fused

    if chunked:
        monkeypatch.setattr(fused, "CONV_CHUNK_ELEMENTS", 1)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 4, 5, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    s1 = torch.rand(3, 1, 4, 5, generator=g, dtype=torch.float64)
    s2 = torch.rand(3, 3, 1, 1, generator=g, dtype=torch.float64)
    w = torch.randn(6, 20, generator=g, dtype=torch.float64)
    for t in (x, s1, s2, w):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: DoubleGate.apply(a, b, c, (a * b).detach()), (x, s1, s2))
    assert torch.autograd.gradcheck(
        lambda a, b, c: GatedChannelProjection.apply(a, b, c, torch.float64)[0], (x, s1, w)
    )
    proj, y1 = GatedChannelProjection.apply(x, s1, w, torch.float64)
    assert torch.equal(y1, x * s1) and not y1.requires_grad
    expected = torch.matmul(w, (x * s1).flatten(2).transpose(1, 2)).unsqueeze(1)
    # the same k = 20-term dot products in two GEMM layouts: each off by at most k u64 sum |w y1|
    # (worst case, element by element)
    terms = torch.matmul(w.abs(), (x * s1).abs().flatten(2).transpose(1, 2)).unsqueeze(1)
    assert ((proj - expected).abs() <= 2 * 20 * U64 * terms).all()


def _factors_by_einsum(theta_phi, w_gg):
    """a = [phi Wr^T; theta Wc^T] (B, G, 2d', n/s), w_gg = [Wr | Wc], by plain autograd ops."""
    n = theta_phi.shape[-1]
    theta, phi = theta_phi.unbind(2)
    return torch.cat([torch.einsum("bgin,gkn->bgik", phi, w_gg[..., :n]),
                      torch.einsum("bgin,gkn->bgik", theta, w_gg[..., n:])], 2)


@pytest.mark.parametrize("groups", [1, 2])
def test_factors_function_gradcheck_and_keeps_no_folded_copy(groups):
    """fused.factors in training: the same a and gradients as plain autograd ops (float64,
    theta_phi a view into the projections as on the layers' path), and only its inputs kept for
    backward, not theta_phi folded into rows (a copy of 2d' x n per sample)."""
    g = torch.Generator().manual_seed(0)
    batch, d_inner, n, n_inner = 3, 2, 5, 4
    proj = torch.rand(batch, groups, 3, d_inner, n, generator=g, dtype=torch.float64, requires_grad=True)
    w_gg = torch.randn(groups, n_inner, 2 * n, generator=g, dtype=torch.float64, requires_grad=True)
    theta_phi = proj.split([2, 1], 2)[0]
    assert torch.autograd.gradcheck(fused.factors, (theta_phi, w_gg))
    a = fused.factors(theta_phi, w_gg)
    assert type(a.grad_fn).__name__ == "FactorsBackward"
    expected = _factors_by_einsum(theta_phi, w_gg)
    # the same n-term dot products in two GEMM layouts
    terms = _factors_by_einsum(theta_phi.abs(), w_gg.abs())
    assert ((a - expected).abs() <= 2 * n * U64 * terms).all()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        fused.factors(theta_phi, w_gg)
    storages = [t.untyped_storage().data_ptr() for t in kept]
    assert storages == [proj.untyped_storage().data_ptr(), w_gg.data_ptr()]


def _embedding_inputs(affine: bool, train: bool, n_inner: int = 3):
    """theta_phi, w_gg, w1e (float64, two agents) and the agents' BatchNorms. ``n_inner`` 3:
    E's products associate through E-sized intermediates (2d' > n/s); 6: through 2d' x 2d' ones."""
    g = torch.Generator().manual_seed(0)
    batch, groups, d_inner, n, k = 3, 2, 2, 5, 2
    theta_phi = torch.rand(batch, groups, 2, d_inner, n, generator=g, dtype=torch.float64)
    w_gg = torch.randn(groups, n_inner, 2 * n, generator=g, dtype=torch.float64)
    w1e = torch.randn(groups, k, n_inner, generator=g, dtype=torch.float64)
    norms = [randomize_bn(nn.BatchNorm1d(n_inner, affine=affine).double()).train(train)
             for _ in range(groups)]
    return theta_phi, w_gg, w1e, norms


def _autograd_form(theta_phi, w_gg, w1e, weight, bias, norms):
    """W1_E ReLU(BN(a^T theta_phi)) by autograd, one F.batch_norm per agent (counting the
    batch as the module does)."""
    batch, groups, _, d_inner, n = theta_phi.shape
    for bn in norms:
        bn.num_batches_tracked += int(bn.training)
    a = _factors_by_einsum(theta_phi, w_gg)
    e = torch.matmul(a.transpose(2, 3), theta_phi.reshape(batch, groups, -1, n))
    m = w_gg.shape[1]
    z = torch.cat([
        torch.nn.functional.batch_norm(
            e[:, i], bn.running_mean, bn.running_var, None if weight is None else weight[i * m:(i + 1) * m],
            None if bias is None else bias[i * m:(i + 1) * m], bn.training, bn.momentum, bn.eps,
        ).unsqueeze(1) for i, bn in enumerate(norms)
    ], 1)
    return torch.matmul(w1e, z.relu())


@pytest.mark.parametrize("n_inner", [3, 6])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_lean_embedding_equals_autograd_form(affine, train, n_inner, chunks):
    """Output, every gradient (gradcheck too) and the running statistics, against autograd."""
    theta_phi, w_gg, w1e, norms = _embedding_inputs(affine, train, n_inner)
    twins = copy.deepcopy(norms)
    weight = torch.cat([bn.weight for bn in norms]).detach() if affine else None
    bias = torch.cat([bn.bias for bn in norms]).detach() if affine else None
    inputs = [t.clone().requires_grad_() for t in (theta_phi, w_gg, w1e) + ((weight, bias) if affine else ())]
    params = (lambda t: (t[3], t[4])) if affine else (lambda t: (None, None))
    upstream = torch.randn(3, 2, 2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def step(form):
        """(output, every input gradient, the norms' running statistics and counters) of a form
        (``lean`` or ``autograd``) run on ``bns`` (a ModuleList of the norms)."""
        def run(bns):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            if form == "lean":
                out = embedding.LeanEmbedding.apply(*leaves[:3], *params(leaves), list(bns), [])
            else:
                out = _autograd_form(*leaves[:3], *params(leaves), list(bns))
            grads = torch.autograd.grad(out, leaves, upstream)
            names = ("running_mean", "running_var", "num_batches_tracked")
            state = [getattr(bn, name) for bn in bns for name in names]
            return [out.detach(), *grads, *state]
        return run

    # Lean BatchNorm statistics (law of total variance, from S a) and its written-out backward
    # against F.batch_norm under autograd: each form within ROUNDING_FACTOR times its own modelled
    # float64 rounding (helpers.RoundingProbe, largest |deviation| per tensor) of the exact value.
    # The forms differ in how they sum and cancel (the backward's mean(g) and mean(g xhat)
    # corrections), so no fixed relative tolerance follows from u64 alone.
    lean_bns, ref_bns = nn.ModuleList(norms), nn.ModuleList(twins)
    n_out = 1 + len(inputs) + 3 * len(norms)
    lean, dev_lean = rounding_envelope(step("lean"), lean_bns, [max_abs] * n_out, dtype=torch.float64)
    ref, dev_ref = rounding_envelope(step("autograd"), ref_bns, [max_abs] * n_out, dtype=torch.float64)
    for i, (got, want, d_got, d_want) in enumerate(zip(lean, ref, dev_lean, dev_ref)):
        error = max_abs(got, want)
        assert error <= ROUNDING_FACTOR * (d_got + d_want), (i, error, d_got, d_want)
    assert torch.autograd.gradcheck(
        lambda *t: embedding.LeanEmbedding.apply(*t[:3], *params(t), norms, []), inputs)


def test_lean_embedding_recomputation_reuses_the_first_run():
    """A filled stash: the same output, no running statistic touched."""
    theta_phi, w_gg, w1e, norms = _embedding_inputs(True, True)
    weight, bias = (torch.cat([getattr(bn, n) for bn in norms]).detach() for n in ("weight", "bias"))
    stash = []
    first = embedding.LeanEmbedding.apply(theta_phi, w_gg, w1e, weight, bias, norms, stash)
    state = copy.deepcopy([bn.state_dict() for bn in norms])
    again = embedding.LeanEmbedding.apply(theta_phi, w_gg, w1e, weight, bias, norms, stash)
    assert torch.equal(first, again)
    for bn, saved in zip(norms, state):
        for name, value in bn.state_dict().items():
            assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize("grad", [True, False], ids=["step", "inference"])
@pytest.mark.parametrize("memory", ["full", "lean", "auto-small", "auto-large"])
def test_lean_holds_no_whole_embedding(memory, grad, monkeypatch):
    """With one sample per chunk, no (B, n/s, n) embedding exists in a lean training step or
    inference call (the full path holds it whole: the check can fail). ``memory="auto"`` is lean
    exactly when the call's embedding holds at least ``AUTO_LEAN_ELEMENTS`` values (here
    3 x n/s x n: the threshold is set just above it, or at it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from reid_attention import _switches

    monkeypatch.setattr(embedding, "CHUNK_ELEMENTS", 1)
    torch.manual_seed(0)
    module = ra.RGA(16, (8, 8), channel=False, memory=memory.partition("-")[0]).train()
    n, n_inner = 64, module.widths["spatial"].tokens
    size = 3 * n_inner * n
    monkeypatch.setattr(_switches, "AUTO_LEAN_ELEMENTS", size + 1 if memory == "auto-small" else size)
    x = torch.rand(3, 16, 8, 8, requires_grad=True)
    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and tuple(t.shape[-2:]) == (n_inner, n):
                    shapes.append(tuple(t.shape))
            return out

    with Record(), torch.set_grad_enabled(grad):
        out = module(x)
        if grad:
            out.sum().backward()
    whole = [s for s in shapes if s[0] == len(x)]  # (B, [1,] n/s, n), not a chunk or a weight
    assert bool(whole) == (memory in ("full", "auto-small")), whole


def test_auto_is_the_default_and_default_is_full_deprecated():
    assert ra.RGA(8, (4, 4)).memory == ra.APNetS(8, (4, 4)).memory == "auto"
    with pytest.warns(DeprecationWarning, match='memory="default" is deprecated.*"full"'):
        m = ra.RGA(8, (4, 4), memory="default")
    assert m.memory == "full"


@pytest.mark.parametrize("kind", ["rga_sc", "apnet_s"])
def test_auto_takes_the_lean_form_only_for_large_embeddings(kind, monkeypatch):
    """The same training step (outputs, gradients, statistics) under "auto" as under "full",
    whichever form "auto" takes; and it takes the lean form exactly above the threshold."""
    import reid_attention._relation as relation
    from reid_attention import _switches

    calls = []
    original = relation.lean_logits
    monkeypatch.setattr(relation, "lean_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
    full = build(kind).train()
    full.memory = "full"
    for threshold, expect_lean in ((1 << 40, False), (1, True)):
        monkeypatch.setattr(_switches, "AUTO_LEAN_ELEMENTS", threshold)
        auto = copy.deepcopy(full)
        auto.memory = "auto"
        calls.clear()
        assert_same_step(run_step(copy.deepcopy(full), x_()), run_step(auto, x_()))
        assert bool(calls) == expect_lean


@pytest.mark.parametrize("kind", ["rga_sc", "apnet_s"])
def test_lean_compiles(kind):
    """torch.compile(fullgraph=True) of a lean layer trains as the eager default path does."""
    default = build(kind).train()
    lean = copy.deepcopy(default)
    lean.memory = "lean"
    lean.compile(fullgraph=True, backend="aot_eager")
    assert_same_step(run_step(default, x_()), run_step(lean, x_()))
