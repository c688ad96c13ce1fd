"""Freezing a prefix: no autograd for frozen blocks, frozen weights bitwise constant,
the rest keeps learning, outputs equal eager with frozen blocks in eval mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fxfreeze
from _nets import Res
from fxfreeze import zoo


def _autograd_nodes(t: torch.Tensor) -> list:
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return list(seen)


def test_no_autograd_node_for_frozen_blocks():
    model = zoo.resnet20()
    x = torch.randn(4, 3, 32, 32)
    fm = fxfreeze.compile(model, (x,))
    counts = []
    for k in range(0, fm.plan.max_frozen + 1, 3):
        fm.freeze_prefix(k)
        nodes = _autograd_nodes(fm(x).sum())
        frozen = {id(fm.params_by_name[n]) for n in fm.frozen_parameter_names()}
        leaves = [n for n in nodes if type(n).__name__ == "AccumulateGrad"]
        assert not any(id(n.variable) in frozen for n in leaves)
        counts.append(len(nodes))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    # with k blocks frozen, the graph holds exactly the nodes of the active suffix:
    # conv/bn ops of frozen blocks leave no ConvolutionBackward / NativeBatchNormBackward
    fm.freeze_prefix(fm.plan.max_frozen)
    nodes = _autograd_nodes(fm(x).sum())
    assert not any("Convolution" in type(n).__name__ for n in nodes)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_frozen_parameters_bitwise_unchanged_and_rest_learns(opt_name):
    torch.manual_seed(0)
    model = zoo.resnet20(num_classes=4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    fm = fxfreeze.compile(model, (x,), optimizer=opt)
    for _ in range(3):  # build optimizer state first
        opt.zero_grad()
        F.cross_entropy(fm(x), y).backward()
        opt.step()
    fm.freeze_prefix(4)
    frozen = fm.frozen_parameter_names()
    assert frozen and all(not fm.params_by_name[n].requires_grad for n in frozen)
    assert all(fm.params_by_name[n] not in opt.state for n in frozen)  # state released
    before = {n: p.detach().clone() for n, p in fm.named_parameters()}
    bn_before = {n: b.clone() for n, b in fm.named_buffers()}
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(fm(x), y).backward()
        opt.step()
    for n, p in fm.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), n
            assert p.grad is None
        elif p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} did not learn"
    # BatchNorm running stats of frozen blocks stop updating
    for n, b in fm.named_buffers():
        if n.startswith(("bn1", "layer1.0", "layer1.1", "layer1.2")) and "running" in n:
            assert torch.equal(b, bn_before[n]), n


def test_frozen_outputs_equal_eager_with_frozen_blocks_in_eval():
    torch.manual_seed(0)
    model = zoo.bert_style()
    x = zoo.example_inputs("bert_style", 4)
    ref = copy.deepcopy(model)
    fm = fxfreeze.compile(model, x)
    fm.train()
    fm.freeze_prefix(3)
    ref.train()
    ref.embeddings.eval()
    ref.layers[0].eval()
    ref.layers[1].eval()
    torch.manual_seed(3)
    out = fm(**x)
    torch.manual_seed(3)
    exp = ref(**x)
    torch.testing.assert_close(out["logits"], exp["logits"], rtol=0, atol=0)
    assert not out["last_hidden_state"].requires_grad or out["last_hidden_state"].grad_fn is not None


def test_unfreeze_restores_training():
    model = zoo.resnet20()
    x = torch.randn(2, 3, 32, 32)
    fm = fxfreeze.compile(model, (x,))
    flags = {n: p.requires_grad for n, p in fm.named_parameters()}
    fm.freeze_prefix(5)
    assert not fm.layer1[0].training
    fm.freeze_prefix(0)
    assert {n: p.requires_grad for n, p in fm.named_parameters()} == flags
    assert fm.layer1[0].training
    out = fm(x).sum()
    out.backward()
    assert fm.conv1.weight.grad is not None


def test_user_frozen_parameter_stays_frozen_after_unfreeze():
    model = zoo.resnet20()
    model.conv1.weight.requires_grad_(False)
    fm = fxfreeze.compile(model)
    fm.freeze_prefix(3)
    fm.freeze_prefix(0)
    assert not model.conv1.weight.requires_grad


def test_train_eval_keep_frozen_blocks_in_eval():
    fm = fxfreeze.compile(zoo.resnet20())
    fm.freeze_prefix(2)
    fm.eval()
    fm.train()
    assert not fm.bn1.training and not fm.layer1[0].training and fm.layer2[0].training


@pytest.mark.parametrize("bad", [-1, 11, 2.0, "3", True, None])
def test_bad_prefix_is_a_clear_error_and_changes_nothing(bad):
    fm = fxfreeze.compile(zoo.resnet20())
    fm.freeze_prefix(2)
    flags = {n: p.requires_grad for n, p in fm.named_parameters()}
    with pytest.raises(fxfreeze.FreezeError):
        fm.freeze_prefix(bad)
    assert fm.num_frozen == 2
    assert {n: p.requires_grad for n, p in fm.named_parameters()} == flags


def test_history_and_logging(caplog):
    import logging

    fm = fxfreeze.compile(zoo.resnet20())
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm.freeze_prefix(2)
    assert fm.freezer.history[-1]["action"] == "freeze"
    assert fm.freezer.history[-1]["blocks"] == ["stem", "layer1.0"]
    assert "freeze stem, layer1.0" in caplog.text
    assert logging.getLogger("fxfreeze").level == logging.NOTSET


def test_eval_mode_first_used_after_a_freeze():
    """The eval-mode graph is captured lazily; when that happens after a freeze, the training
    graph carries the cut's extra nodes, which must not confuse the block transfer."""
    import fxfreeze as _fx
    from fxfreeze import zoo as _zoo

    torch.manual_seed(0)
    model = _zoo.resnet20()
    x = torch.randn(4, 3, 32, 32)
    fm = _fx.compile(model, (x,), policy="manual")
    fm.train()
    fm(x)
    fm.freeze_prefix(3)
    fm.eval()
    out = fm(x)
    model.eval()
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    blocks = [n.meta.get("fxfreeze.block") for n in fm.graph_module(False).graph.nodes
              if n.op.startswith("call") and not n.meta.get("fxfreeze.inserted")]
    assert None not in blocks


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_freeze_between_two_optimizers_steps_keeps_the_others_last_update(set_to_none):
    """Two optimizers over one model (SparseAdam for a sparse embedding beside Adam, Muon for
    matrices beside AdamW), the clock's first: a freeze decided after its step cleared the
    newly frozen parameters' gradients and state before the other optimizer stepped, so they
    missed the last update eager code gives them (params off by 1e-2 from that step on).
    Now they keep both until the model's next call; then they are dropped, and the frozen
    parameters stay bitwise still even with ``zero_grad(set_to_none=False)``. Exact: the
    same operations in the same order."""
    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), Res(16), Res(16), torch.nn.Linear(16, 3))
        return m, [torch.optim.Adam(m[0].parameters(), lr=1e-2),
                   torch.optim.AdamW([p for p in m.parameters() if all(p is not q for q in m[0].parameters())],
                                     lr=1e-2, weight_decay=0.1)]

    model, opts = make()
    ref, ref_opts = make()
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opts,
                          config={"policy": "manual", "manual": {"schedule": {3: 2}, "unit": "step"}})
    g = torch.Generator().manual_seed(1)
    for step in range(7):
        x = torch.randn(4, 8, generator=g)
        if step == 3:  # eager: frozen once the round of step 3 is over
            for p in list(ref[0].parameters()) + list(ref[1].parameters()):
                p.requires_grad_(False)
                p.grad = None
        if step == 5:
            still = [p.detach().clone() for p in list(model[0].parameters()) + list(model[1].parameters())]
        for m, os_ in ((fm, opts), (ref, ref_opts)):
            for o in os_:
                o.zero_grad(set_to_none=set_to_none)
            m(x).square().mean().backward()
            for o in os_:
                o.step()
        for (n, a), b in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), (step, n)
    assert fm.num_frozen == 2
    assert all(torch.equal(a, b) for a, b in zip(still, list(model[0].parameters()) + list(model[1].parameters())))
    assert all(p not in o.state for o in opts for p in model[1].parameters())  # state released after the round
