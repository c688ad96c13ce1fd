"""CutBackward: numerics, structure, lint, reversibility."""

from __future__ import annotations

import pytest
import torch

import fxfreeze
from fxfreeze import zoo
from fxfreeze.api import analyze
from fxfreeze.passes import META_INSERTED, CutBackward, GraphPass, PassResult, UndoCut, run_passes
from fxfreeze.passes.cut_backward import detach_tree, grad_off, grad_restore
from _nets import SharedDropout


def _gm():
    model = zoo.resnet20()
    x = torch.randn(2, 3, 32, 32)
    a = analyze(model, (x,))
    return model, x, a.capture.build(model)


def test_structure_lint_and_numerics():
    model, x, gm = _gm()
    ref = model(x)
    res = CutBackward(3)(gm)
    assert res.modified
    res.graph_module.graph.lint()
    inserted = [n for n in gm.graph.nodes if n.meta.get(META_INSERTED)]
    targets = [n.target for n in inserted]
    assert targets.count(grad_off) == 1 and targets.count(grad_restore) == 1
    assert targets.count(detach_tree) == 1  # one tensor crosses a residual-block boundary
    order = list(gm.graph.nodes)
    off = next(n for n in inserted if n.target is grad_off)
    restore = next(n for n in inserted if n.target is grad_restore)
    prefix = [n for n in order if n.meta.get("fxfreeze.block") is not None and 0 <= n.meta["fxfreeze.block"] < 3 and n.op.startswith("call") and not n.meta.get(META_INSERTED)]
    assert order.index(off) < order.index(prefix[0]) and order.index(restore) > order.index(prefix[-1])
    out = gm(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.is_grad_enabled()


def test_idempotent_and_reversible():
    model, x, gm = _gm()
    code0 = gm.code

    def shape():
        return [(n.op, n.target, n.meta.get("fxfreeze.block")) for n in gm.graph.nodes]

    CutBackward(4)(gm)
    shape4 = shape()
    assert CutBackward(4)(gm).modified  # re-applied from scratch
    assert shape() == shape4
    CutBackward(0)(gm)
    assert gm.code == code0


def test_dropout_flag_switched_in_prefix_only():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(3))
            self.out = torch.nn.Linear(8, 2)

        def forward(self, x):
            for b in self.blocks:
                x = torch.nn.functional.dropout(b(x), 0.5, self.training)
            return self.out(x)

    net = Net().train()
    a = analyze(net, (torch.randn(4, 8),))
    gm = a.capture.build(net)
    CutBackward(2)(gm)
    drops = [n for n in gm.graph.nodes if n.target is torch.nn.functional.dropout]
    flags = [n.kwargs.get("training", n.args[2] if len(n.args) > 2 else None) for n in drops]
    blocks = [n.meta["fxfreeze.block"] for n in drops]
    in_prefix = [0 <= b < 2 for b in blocks]  # the head is block -1
    assert any(in_prefix) and not all(in_prefix)
    assert all(f is False for f, p in zip(flags, in_prefix) if p)
    assert all(f is True for f, p in zip(flags, in_prefix) if not p)
    CutBackward(0)(gm)
    assert all((n.kwargs.get("training", n.args[2] if len(n.args) > 2 else None)) is True for n in drops)


def test_grad_mode_restored_after_exception_in_prefix():
    """The graph itself cannot restore autograd when its frozen prefix raises (grad_restore
    is never reached); the compiled module's call does."""
    fm = fxfreeze.compile(zoo.resnet20(), (torch.randn(2, 3, 32, 32),))
    fm.freeze_prefix(3)
    bad = torch.randn(2, 5, 32, 32)  # the first convolution (block 0) refuses 5 channels
    assert fm.graphs.lookup(True, (bad,), {}) is not None  # the call runs the graph, not eager
    assert torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="channels"):
        fm(bad)
    assert torch.is_grad_enabled()


def test_runner_names_the_failing_pass_and_the_ones_before():
    model, x, gm = _gm()
    with pytest.raises(fxfreeze.PassError, match=r"'cut_backward' \(after undo_cut\): precondition failed: compute nodes without a block label"):
        unlabelled = _gm()[2]
        for n in unlabelled.graph.nodes:
            n.meta.pop("fxfreeze.block", None)
        run_passes(unlabelled, [UndoCut(), CutBackward(2)])

    class Broken(GraphPass):
        name = "broken"

        def call(self, gm):
            gm.graph.erase_node(next(iter(gm.graph.nodes)))  # leaves users behind
            return PassResult(gm, True)

    with pytest.raises(fxfreeze.PassError, match=r"'broken' \(after cut_backward\)") as e:
        run_passes(gm, [CutBackward(1), Broken()])
    assert e.value.pass_name == "broken" and e.value.before == ("cut_backward",)
    assert e.value.__cause__ is not None


def test_postcondition_catches_labels_out_of_execution_order():
    """A node of a later block inside the prefix would silently lose its gradients."""
    model, x, gm = _gm()
    compute = [n for n in gm.graph.nodes if n.op.startswith("call")]
    compute[1].meta["fxfreeze.block"] = 5  # inside block 0, labelled as a later block
    with pytest.raises(fxfreeze.PassError, match=f"postcondition failed: node {compute[1].name}"):
        CutBackward(2)(gm)


def test_undo_is_public_and_restores_the_graph():
    model, x, gm = _gm()
    code0 = gm.code
    CutBackward(3)(gm)
    assert gm.code != code0
    res = UndoCut()(gm)
    assert res.modified and gm.code == code0
    gm.graph.lint()
    assert not UndoCut()(gm).modified
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_attention_dropout_is_off_in_a_frozen_prefix():
    """torch.export bakes attention dropout as a probability in scaled_dot_product_attention:
    a frozen (eval-mode) block must not drop, a trainable one still must; undo restores it."""
    model = zoo.transformer_classifier()
    (tokens,) = zoo.example_inputs("transformer_classifier", 4)
    fm = fxfreeze.compile(model, (tokens,), policy="manual")
    gm = fm.graph_module(True)
    sdpa = [n for n in gm.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert sdpa and all(n.args[4] > 0 for n in sdpa)
    CutBackward(2)(gm)
    gm.graph.lint()
    for n in sdpa:
        b = n.meta["fxfreeze.block"]
        assert (n.args[4] == 0.0) == (0 <= b < 2)
    CutBackward(0)(gm)
    assert all(n.args[4] > 0 for n in sdpa)


def test_a_module_shared_with_later_blocks_runs_in_eval_mode_in_the_prefix_only():
    """No block owns a module that several blocks call, so a freeze held none of them in
    eval mode: the frozen prefix went on dropping out (unlike its other modules), and an
    activation cache kept one draw of it for good."""
    torch.manual_seed(0)
    net, x = SharedDropout().train(), torch.randn(4, 8)
    gm = analyze(net, (x,)).capture.build(net)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"].count("drop") == 5
    code0 = gm.code
    CutBackward(2)(gm)  # stem and blocks.0
    gm.graph.lint()
    for seed in range(3):
        torch.manual_seed(seed)
        out = gm(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(out, net.by_hand(x, 2), rtol=0, atol=0)  # same ops, same draws
    assert net.drop.training
    from fxfreeze.passes.cut_backward import call_in_eval

    calls = [n for n in gm.graph.nodes if n.target is call_in_eval]
    assert [n.meta["fxfreeze.block"] for n in calls] == [0, 1]
    assert all(n.args[0].op == "get_attr" and n.args[0].target == "drop" for n in calls)
    assert [n.meta["fxfreeze.block"] for n in gm.graph.nodes if n.op == "call_module" and n.target == "drop"] == [2, -1, -1]
    CutBackward(0)(gm)
    assert gm.code == code0

    # compiled and frozen by the runtime: the same, gradients included
    fm = fxfreeze.compile(net, (x,), config={"policy": "manual", "manual": {"schedule": {}}})
    assert fm.strategy == "fx"
    fm.train()
    fm.freeze_prefix(3)
    torch.manual_seed(5)
    out = fm(x)
    grads = torch.autograd.grad(out.square().mean(), [p for p in net.parameters() if p.requires_grad])
    torch.manual_seed(5)
    expected = net.by_hand(x, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for p in net.parameters():
        p.requires_grad_(True)
    frozen = set(fm.frozen_parameter_names(3))
    trainable = [p for n, p in net.named_parameters() if n not in frozen]
    want = torch.autograd.grad(expected.square().mean(), trainable)
    assert len(want) == len(grads)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("strategy", ["fx", "hooks"])
def test_a_channels_last_output_handed_to_a_trainable_groupnorm_does_not_crash(strategy):
    """torch before 2.14 crashed the process (a segmentation fault, CPU) in GroupNorm's
    backward when its input was channels_last and needed no gradient: what a frozen prefix
    hands on in diffusers' VAE and UNet. The cut makes such a tensor contiguous there; the
    gradients equal an eager reference's. Run in a subprocess: a regression kills it, not
    the suite. (``hooks``: a model that runs its own forward, cut by hooks.)"""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("_channels_last_gn.py")
    done = subprocess.run([sys.executable, str(script), strategy], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5
