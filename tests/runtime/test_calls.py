"""Any call the eager model accepts: graphs per kind of call, their bound, eager fallback,
the model's own signature, one training mode, a second compile, bounded capture."""

from __future__ import annotations

import copy
import inspect
import logging
import time

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze import zoo
from fxfreeze.timebound import CaptureTimeout, time_bound
from _nets import Res


class _Net(nn.Module):
    """Residual MLP with an optional scale and a flag that changes the output structure."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)) for _ in range(3))
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0, both: bool = False) -> torch.Tensor | tuple:
        h = self.bn(self.inp(x))
        for b in self.blocks:
            h = h + b(h)
        y = self.out(h) * scale
        return (y, h) if both else y


def test_other_keyword_sets_get_their_own_graph_and_match_eager():
    torch.manual_seed(0)
    model = _Net()
    ref = copy.deepcopy(model)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), policy="manual")
    x = torch.randn(5, 8)
    torch.testing.assert_close(fm(x), ref(x), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fm(x, scale=2.0), ref(x, scale=2.0), rtol=1e-6, atol=1e-7)
    y, h = fm(x, both=True)
    y2, h2 = ref(x, both=True)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h, h2, rtol=1e-6, atol=1e-7)
    n = len(fm.graphs)
    assert n == 3
    fm(x, 2.0)  # the same call as scale=2.0, spelt positionally
    fm(torch.randn(7, 8), scale=2.0)  # another batch size
    assert len(fm.graphs) == n
    # every graph carries the plan's blocks and follows the frozen prefix
    fm.freeze_prefix(2)
    for e in fm.graphs.entries():
        gm = fm.graph_module_of(e)
        gm.graph.lint()
        assert any(node.meta.get("fxfreeze.inserted") for node in gm.graph.nodes)


class _KwNet(_Net):
    """A forward that takes ``**kw``: ignored (``used=False``) or read (``kw.get``)."""

    def __init__(self, used: bool) -> None:
        super().__init__()
        self.used = used

    def forward(self, x: torch.Tensor, *rest: torch.Tensor, **kw: float) -> torch.Tensor:  # type: ignore[override]
        h = self.bn(self.inp(x))
        for b in self.blocks:
            h = h + b(h)
        y = self.out(h)
        if self.used and kw.get("scale") is not None:
            y = y * kw["scale"]
        return y


@pytest.mark.parametrize("used", [False, True])
def test_a_forward_with_var_keywords_matches_eager_on_every_call(used):
    """fx gives ``*rest``/``**kw`` one opaque placeholder each: ignored by the forward, they
    are dropped and the fx graph stands; read by it, the fx graph would take the
    ``kw.get(...) is not None`` branch on every call, so the capture goes to export, which
    specialises each call's keywords."""
    torch.manual_seed(0)
    model = _KwNet(used)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt, policy="manual")
    assert fm.strategy == ("export" if used else "fx")
    if used:  # the plan says why fx was left
        assert "**kw" in " ".join(fm.plan.notes)
    x = torch.randn(5, 8)
    for call in ({}, {"scale": 2.0}):
        torch.testing.assert_close(fm(x, **call), ref(x, **call), rtol=1e-6, atol=1e-7)
    fm.freeze_prefix(2)
    for e in fm.graphs.entries():
        gm = fm.graph_module_of(e)
        gm.graph.lint()
        assert not any(n.op == "placeholder" and str(n.target).startswith("*") for n in gm.graph.nodes)
    fm(x, scale=3.0).sum().backward()
    assert all(p.grad is None for n, p in fm.named_parameters() if n in set(fm.frozen_parameter_names()))


def test_signature_is_the_models():
    model = _Net()
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), policy="manual")
    assert inspect.signature(fm.forward) == inspect.signature(model.forward)
    assert list(inspect.signature(fm.forward).parameters) == ["x", "scale", "both"]


def test_a_call_the_model_refuses_is_a_clear_error():
    fm = fxfreeze.compile(_Net(), (torch.randn(4, 8),), policy="manual")
    with pytest.raises(fxfreeze.CallError, match="labels"):
        fm(torch.randn(2, 8), labels=torch.zeros(2))
    with pytest.raises(TypeError):  # CallError is a TypeError, like the eager model's
        fm()


def test_past_max_graphs_calls_run_eagerly_with_one_warning(caplog):
    torch.manual_seed(0)
    model = _Net()
    ref = copy.deepcopy(model)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), policy="manual", max_graphs=2)
    x = torch.randn(3, 8)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        for s in (1.5, 2.5, 3.5, 4.5):
            torch.testing.assert_close(fm(x, scale=s), ref(x, scale=s), rtol=1e-6, atol=1e-7)
    assert len(fm.graphs) == 2
    assert caplog.text.count("max_graphs=2") == 1
    # eager calls still honour the frozen prefix: no gradient for frozen parameters
    fm.freeze_prefix(2)
    fm(x, scale=9.0).sum().backward()
    for n in fm.frozen_parameter_names():
        assert fm.params_by_name[n].grad is None


class _Opaque(nn.Module):
    """The example call captures; a call with ``mode="loop"`` does data-dependent Python
    control flow that no graph can hold."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, mode: str = "plain") -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
            if mode == "loop":
                while x.norm() > 1:  # data-dependent: fx and export both refuse it
                    x = x / 2
        return self.head(x)


def test_a_call_that_cannot_be_captured_runs_eagerly(caplog):
    torch.manual_seed(0)
    model = _Opaque()
    ref = copy.deepcopy(model)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), policy="manual")
    x = torch.randn(4, 8) * 10
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        torch.testing.assert_close(fm(x, mode="loop"), ref(x, mode="loop"))
        torch.testing.assert_close(fm(x, mode="loop"), ref(x, mode="loop"))
    assert caplog.text.count("cannot be captured") == 1
    assert len(fm.graphs.eager_calls) == 1


def test_one_training_mode_shared_with_the_model():
    torch.manual_seed(0)
    model = zoo.resnet20()
    x = torch.randn(4, 3, 32, 32)
    fm = fxfreeze.compile(model, (x,), policy="manual")
    model.eval()
    assert not fm.training
    with torch.no_grad():
        torch.testing.assert_close(fm(x), model.forward(x))  # the eval graph runs
    fm.train()
    assert model.training
    fm.freeze_prefix(3)
    frozen = fm.frozen_modules
    assert frozen and all(not m.training for m in frozen)
    model.train()  # the model's own train() does not wake frozen blocks up
    assert all(not m.training for m in frozen)
    stats = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
    fm(x)
    for n in stats:
        if n.startswith(("bn1", "layer1.0", "layer1.1")):
            assert torch.equal(stats[n], dict(model.named_buffers())[n]), n
    fm.freeze_prefix(0)
    assert all(m.training for m in frozen)


def test_a_second_compile_takes_over_and_the_first_lets_go(caplog):
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt, policy="manual")
    first.freeze_prefix(2)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        second = fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt, policy="manual")
    assert "already compiled" in caplog.text
    assert first.num_frozen == 0 and second.num_frozen == 0
    assert all(p.requires_grad for p in model.parameters())
    steps = second.freezer.step_count
    opt.zero_grad()
    second(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert second.freezer.step_count == steps + 1
    assert first.freezer.step_count == 0  # its optimizer hook is gone


def test_install_routes_the_model_to_the_compiled_module():
    torch.manual_seed(0)
    model = _Net()
    ref = copy.deepcopy(model)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), policy="manual")
    fm.install()
    assert inspect.signature(model.forward) == inspect.signature(ref.forward)
    fm.freeze_prefix(2)
    x = torch.randn(4, 8)
    model(x).sum().backward()  # through the graph: frozen blocks get no gradient
    assert all(fm.params_by_name[n].grad is None for n in fm.frozen_parameter_names())
    assert model.out.weight.grad is not None
    fm.uninstall()
    assert "forward" not in model.__dict__


def test_moving_to_another_dtype_captures_again():
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(4, 8)
    fm = fxfreeze.compile(model, (x,), policy="manual")
    fm.to(torch.float64)
    out = fm(x.double())
    assert out.dtype == torch.float64
    fm.eval()
    with torch.no_grad():
        torch.testing.assert_close(fm(x.double()), model.forward(x.double()))
    assert fm.graph_module(False) is not None  # the example call's graph, re-captured in float64


def test_time_bound_interrupts_python_and_lets_fast_code_finish():
    with time_bound(5.0):
        s = sum(range(1000))
    assert s == 499500
    t = time.perf_counter()
    with pytest.raises(CaptureTimeout):
        with time_bound(0.2):
            while True:
                pass
    assert time.perf_counter() - t < 60  # it did end (no timing claim beyond that)


class _Hangs(nn.Module):
    """Tracing never ends (as export on some models does inside sympy); eager is fine."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy) or torch.compiler.is_exporting() or torch._guards.detect_fake_mode(x) is not None:
            while True:
                pass
        return self.head(self.blocks(x))


def test_capture_that_hangs_falls_back_within_its_bound():
    p = fxfreeze.plan(_Hangs(), (torch.randn(2, 4),), capture_timeout=0.5)
    assert p.strategy == "hooks"
    assert any("fx tracing took longer than 0.5 s" in n for n in p.notes), p.notes
    assert any("dynamic shapes took longer" in n for n in p.notes)
    assert any("static shapes took longer" in n for n in p.notes)
    with pytest.raises(fxfreeze.TraceError):
        fxfreeze.plan(_Net(), (torch.randn(2, 8),), capture_timeout=-1)


def test_a_call_the_model_itself_fails_on_raises_its_own_error_and_is_retried():
    torch.manual_seed(0)
    model = _Net()
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), policy="manual")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fm(torch.randn(4, 5), scale=3.0)  # 5 features where the model takes 8
    assert not fm.graphs.eager_calls
    assert fm(torch.randn(4, 8), scale=3.0).shape == (4, 4)  # the same kind of call, now valid: a graph


class _Features(nn.Module):
    """sentence-transformers' calling convention: a dict of features in, the same dict out
    with the model's outputs written into it; a constant position buffer indexes an
    embedding (its index is saved for the backward pass), as in BERT."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.pos = nn.Embedding(32, 16)
        self.register_buffer("position_ids", torch.arange(32).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
        self.out = nn.Linear(16, 4)

    def forward(self, features: dict) -> dict:
        ids = features["input_ids"]
        h = self.tok(ids) + self.pos(self.position_ids[:, : ids.shape[1]])
        if "boost" in features:
            h = h * features["boost"]
        for b in self.blocks:
            h = h + b(h)
        features.update({"token_embeddings": h, "embedding": self.out(h.mean(1))})
        return features


def test_a_forward_that_writes_into_its_input_dict_gets_one_graph_and_keeps_the_example():
    """Capturing runs the model: its writes into the input dict must not reach the example
    inputs the graph is keyed on (else every later call, with the caller's own fresh dict,
    would miss that graph and capture again) nor the caller's dict."""
    torch.manual_seed(0)
    model = _Features()
    ids = torch.randint(0, 50, (4, 7))
    example = {"input_ids": ids}
    fm = fxfreeze.compile(model, (example,), config={"policy": "manual"})
    assert list(example) == ["input_ids"]
    for n in (7, 9):
        out = fm({"input_ids": torch.randint(0, 50, (4, n))})
        assert set(out) >= {"input_ids", "embedding"}
    assert len(fm.graphs) == 1
    model.eval()
    x = {"input_ids": ids}
    torch.testing.assert_close(fm(dict(x))["embedding"], model(dict(x))["embedding"], rtol=1e-5, atol=1e-6)
    for e in fm.graphs.entries():
        fm.graph_module_of(e).graph.lint()


def test_a_capture_between_a_forward_and_its_backward_leaves_the_saved_buffers_alone():
    """A step that calls the model twice (a Siamese loss), the second time with a new kind
    of call: the capture it triggers runs the model under preserved state. It must not
    write back a buffer it did not change, or the first forward's backward, which saved a
    slice of that buffer (the position ids), fails with "modified by an inplace operation"."""
    torch.manual_seed(0)
    model = _Features()
    ids = torch.randint(0, 50, (4, 7))
    fm = fxfreeze.compile(model, ({"input_ids": ids},), config={"policy": "manual"})
    fm.train()
    version = model.position_ids._version
    a = fm({"input_ids": ids})["embedding"]
    b = fm({"input_ids": ids, "boost": torch.tensor(2.0)})["embedding"]  # a new kind: captured now
    assert len(fm.graphs) == 2 and model.position_ids._version == version
    (a - b).pow(2).sum().backward()
    ref = _Features()
    ref.load_state_dict(model.state_dict())
    ra = ref({"input_ids": ids})["embedding"]
    rb = ref({"input_ids": ids, "boost": torch.tensor(2.0)})["embedding"]
    (ra - rb).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for e in fm.graphs.entries():
        fm.graph_module_of(e).graph.lint()


def test_a_capture_between_a_forward_and_its_backward_leaves_batchnorm_stats_usable():
    """The same with BatchNorm in training mode: the capture's forward changes the running
    stats and preserved state puts them back; the first forward's backward still runs, and
    gradients and running stats equal the eager model's two calls."""
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(8, 8)
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
    fm.train()
    ref = copy.deepcopy(model)
    a = fm(x)
    b = fm(x, scale=2.0)  # a new kind of call: captured between a's forward and its backward
    assert len(fm.graphs) == 2
    (a - b).pow(2).sum().backward()
    (ref(x) - ref(x, scale=2.0)).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, buf), rbuf in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(buf, rbuf, rtol=1e-5, atol=1e-6, msg=name)


def test_a_mapping_graphs_cannot_take_runs_as_its_dict():
    """A tokenizer's BatchEncoding (a UserDict) as the model's argument, at compile and at
    every call: the graph takes the same items as a dict, instead of the whole model running
    eagerly because torch.export refuses the type."""
    from collections import UserDict

    torch.manual_seed(0)
    model = _Features()
    ids = torch.randint(0, 50, (4, 7))
    fm = fxfreeze.compile(model, (UserDict(input_ids=ids),), config={"policy": "manual"})
    assert not fm.eager_only and fm.plan.strategy in ("fx", "export")
    model.eval()
    for call in (UserDict(input_ids=ids), {"input_ids": ids}):
        torch.testing.assert_close(fm(call)["embedding"], model(dict(call))["embedding"], rtol=1e-5, atol=1e-6)
    assert len(fm.graphs) == 2  # the compile's training graph and one eval graph for both calls
    for e in fm.graphs.entries():
        fm.graph_module_of(e).graph.lint()


class _Shifted(nn.Module):
    """Residual blocks, and a parameter of the root's own (as a ViT's position embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(16))
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 3)
        self.blocks = nn.Sequential(*[Res(16) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x) + self.shift))


@pytest.mark.parametrize("strategy", ["fx", "export"])
def test_functional_call_and_per_sample_gradients_see_the_parameters_of_each_call(strategy):
    """``torch.func.functional_call`` substitutes tensors for the model's parameters for one
    call (per-sample gradients with ``vmap(grad(...))``, meta-learning). An exported graph
    module used to bind the tensors it was built with: built during such a call, it kept the
    substitutes, and every later call of the compiled module ignored the model's parameters
    (wrong outputs, no gradient), silently; a parameter at the root was never substituted
    (the compiled module registered it apart from the model), nor read anew by a graph."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = _Shifted()
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    fm = fxfreeze.compile(model, (x,), strategy=strategy, config={"policy": "manual"})
    assert fm.strategy == strategy
    doubled = {n: p.detach() * 2 for n, p in model.named_parameters()}
    torch.testing.assert_close(functional_call(fm, doubled, (x,)), functional_call(ref, doubled, (x,)), rtol=1e-6, atol=1e-6)
    out = fm(x)  # the model's own parameters again
    assert out.requires_grad
    torch.testing.assert_close(out, ref(x), rtol=1e-6, atol=1e-6)

    def per_sample(m: nn.Module) -> dict[str, torch.Tensor]:
        def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(functional_call(m, p, (xi[None],)), yi[None])

        params = {n: p.detach() for n, p in m.named_parameters()}
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    vmap(lambda xi: functional_call(fm, doubled, (xi[None],)))(x)  # a graph built under vmap, without grad
    got, want = per_sample(fm), per_sample(ref)
    for name in want:  # before: all zeros (export)
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    fm.freeze_prefix(2)  # the cut graph reads them too
    torch.testing.assert_close(functional_call(fm, doubled, (x,)), functional_call(ref, doubled, (x,)), rtol=1e-6, atol=1e-6)


class _Memory:
    """A state object a forward appends to, as a key/value cache (HF ``DynamicCache``)."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def remember(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.detach())
        return torch.cat(self.rows, dim=1).mean(dim=1, keepdim=True)


class _Recalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.layers = nn.ModuleList(Res(8) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, memory: _Memory | None = None) -> torch.Tensor:
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        if memory is not None:  # a value-dependent object: no graph takes it, the model's own forward runs
            h = h + memory.remember(h)
        return self.head(h)


@pytest.mark.parametrize("first", [False, True], ids=["new-kind-of-call", "first-call-compiles"])
def test_capturing_a_call_leaves_the_state_objects_it_was_given_alone(first):
    """Capturing a new kind of call runs the model on it (eagerly, then tracing). A state
    object among the arguments that the forward appends to (Hugging Face's ``DynamicCache``,
    which ``generate`` passes) took that run's rows, so the real call saw them twice: a
    routed Llama generated other tokens than the plain model. Each capture run now gets its
    own copy of such objects; the call's object holds exactly its own call's rows."""
    torch.manual_seed(0)
    model = _Recalls()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 8)
    mine, theirs = _Memory(), _Memory()
    if first:  # the integrations' first call: the capture is made on it, then it runs
        fm = fxfreeze.compile(model, {"x": x, "memory": mine}, policy="manual")
    else:
        fm = fxfreeze.compile(model, (x,), policy="manual")
    for _ in range(2):
        torch.testing.assert_close(fm(x, memory=mine), ref(x, memory=theirs), rtol=0, atol=0)
    assert len(mine.rows) == len(theirs.rows) == 2
