"""Bad inputs and faults from the fault campaign: each gets a clear FxFreezeError (or a
warning that says what happened), never silent wrong behaviour."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfreeze
from fxfreeze import FreezeConfig, zoo
from fxfreeze.cli import main as cli_main


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), *[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4)], nn.Linear(16, 3))


# -- silent wrong behaviour ---------------------------------------------------------------------
def test_egeria_waits_at_batch_size_one_instead_of_freezing_everything(caplog):
    """A one-sample probe makes the SP loss identically 0 (every block "converged"): the
    policy fills the probe from later batches and waits meanwhile, saying so once."""
    model = zoo.resnet20(num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = {"egeria": {"eval_interval": 2, "window": 3, "patience": 1, "asynchronous": False, "overhead_budget": 0.0,
                      "probe_size": 16}}
    fm = fxfreeze.compile(model, (torch.randn(2, 3, 16, 16),), optimizer=opt, config=cfg)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        for _ in range(12):
            opt.zero_grad()
            F.cross_entropy(fm(torch.randn(1, 3, 16, 16)), torch.randint(0, 4, (1,))).backward()
            opt.step()
    probe = fm.freezer.policy.probe
    assert fm.num_frozen == 0 and fm.freezer.policy.evaluations == 0
    assert caplog.text.count("needs at least 2") == 1
    assert probe.samples == 12 and not probe.ready
    assert fm.probe_hook is not None  # still filling (16 wanted)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(fm(torch.randn(1, 3, 16, 16)), torch.randint(0, 4, (1,))).backward()
        opt.step()
    assert probe.samples == 16 and probe.ready and fm.probe_hook is None


class _MessagePassing(nn.Module):
    """A graph layer: each node adds the mean of its neighbours' messages (``index_add_``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin, self.norm = nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        if edges.shape[0] == x.shape[0]:  # a dense adjacency matrix, rows normalised
            return x + F.relu(self.norm(edges @ self.lin(x)))
        src, dst = edges
        agg = torch.zeros_like(x).index_add_(0, dst, self.lin(x)[src])
        deg = torch.zeros(x.shape[0]).index_add_(0, dst, torch.ones(dst.shape[0])).clamp(min=1)
        return x + F.relu(self.norm(agg / deg[:, None]))


class _GraphNet(nn.Module):
    """Node classification: the batch is a graph, its leading dimension nodes, not samples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 3)
        self.layers = nn.ModuleList(_MessagePassing(16) for _ in range(4))

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, edges)
        return self.out(h)


def _graph(g: torch.Generator, nodes: int, dense: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    edges = torch.randint(0, nodes, (2, 3 * nodes), generator=g)
    if dense:
        adj = torch.zeros(nodes, nodes).index_put_((edges[1], edges[0]), torch.ones(edges.shape[1]), accumulate=True)
        edges = adj / adj.sum(1, keepdim=True).clamp(min=1)
    return torch.randn(nodes, 8, generator=g), edges, torch.randint(0, 3, (nodes,), generator=g)


_FAST_EGERIA = {"egeria": {"eval_interval": 2, "window": 3, "patience": 1, "asynchronous": False,
                           "overhead_budget": 0.0, "probe_size": 16}}


@pytest.mark.parametrize("dense", [False, True])
def test_egeria_on_a_graph_network_probes_the_whole_graph_when_a_slice_cannot_run(dense, caplog, capfd):
    """The probe took the first 16 rows of every tensor whose leading dimension is the first
    one's: 16 nodes, and the edge list (2 rows) whole, which indexes the nodes dropped, or
    16 rows of a dense adjacency matrix, whose columns still count every node. Before, the
    first evaluation raised (``IndexError``, a shape error) out of ``opt.step()``: training died."""
    g = torch.Generator().manual_seed(0)
    model = _GraphNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fm = fxfreeze.compile(model, _graph(g, 30, dense)[:2], optimizer=opt, config=_FAST_EGERIA)
    sizes = [40, 33, 57, 41, 62, 38, 45, 50, 36, 44, 39, 52]
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        for n in sizes:
            x, edges, y = _graph(g, n, dense)
            opt.zero_grad()
            F.cross_entropy(fm(x, edges), y).backward()
            opt.step()
    policy = fm.freezer.policy
    assert policy.evaluations >= 3 and policy.probe.samples == sizes[0]
    assert policy.probe.args[0].shape[0] == sizes[0]
    assert policy.probe.args[1].shape == ((sizes[0], sizes[0]) if dense else (2, 3 * sizes[0]))
    assert caplog.text.count("the whole first batch (40 samples) is the probe") == 1
    assert "FX-traced Module" not in capfd.readouterr().err  # fx's print of the failed guess, dropped


def test_a_probe_that_cannot_run_stops_egeria_and_training_goes_on(caplog, monkeypatch):
    from fxfreeze.runtime.egeria.probe import ActivationProbe

    def fails(self, hi):
        raise RuntimeError("a block refuses the probe batch")

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt, config=_FAST_EGERIA)
    monkeypatch.setattr(ActivationProbe, "_run", fails)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        for _ in range(10):
            opt.zero_grad()
            F.cross_entropy(fm(torch.randn(8, 8)), torch.randint(0, 3, (8,))).backward()
            opt.step()
    assert fm.freezer.step_count == 10 and fm.num_frozen == 0 and fm.freezer.policy.probe is None
    assert caplog.text.count("a block refuses the probe batch); no further freezing decisions") == 1


def _token_net() -> nn.Module:
    from _nets import TokenStack

    torch.manual_seed(0)
    return TokenStack(layers=4)


def test_egeria_on_packed_sequences_compares_positions(caplog):
    """Padding-free batches (HF's ``DataCollatorWithFlattening``, TRL's packing) hold one row
    of concatenated sequences, of another length each time. Before, the probe (one sample)
    could never be filled from later batches of other lengths, and Egeria waited forever:
    0 evaluations, never a freeze, on every packed run."""
    g = torch.Generator().manual_seed(0)
    model = _token_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fm = fxfreeze.compile(model, (torch.randint(0, 50, (1, 20), generator=g),), optimizer=opt, config=_FAST_EGERIA)
    lengths = [37, 52, 41, 60, 33, 48, 55, 39, 44, 58, 36, 50]
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        for n in lengths:
            ids = torch.randint(0, 50, (1, n), generator=g)
            opt.zero_grad()
            F.cross_entropy(fm(ids)[0, :-1], ids[0, 1:]).backward()
            opt.step()
    policy = fm.freezer.policy
    probe = policy.probe
    assert probe.positions and probe.samples == lengths[0] and probe.args[0].shape == (1, lengths[0])
    assert policy.evaluations >= 3
    assert caplog.text.count("compares the probe's 37 positions") == 1 and "needs at least 2" not in caplog.text
    state = fm.freezer.state_dict()  # a resume keeps comparing positions
    other = _token_net()
    fresh = fxfreeze.compile(other, (torch.randint(0, 50, (1, 20)),), optimizer=torch.optim.SGD(other.parameters(), lr=0.05),
                             config=_FAST_EGERIA)
    fresh.freezer.load_state_dict(state)
    assert fresh.freezer.policy.probe.positions and fresh.freezer.policy.probe.samples == lengths[0]


def test_an_optimizer_without_the_models_parameters_is_refused():
    model = _mlp()
    other = torch.optim.SGD(_mlp().parameters(), lr=0.1)
    with pytest.raises(fxfreeze.ConfigError, match="holds none of"):
        fxfreeze.compile(model, (torch.randn(2, 8),), optimizer=other, policy="manual")


def test_an_optimizer_holding_some_parameters_is_named_in_a_warning(caplog):
    model = _mlp()
    opt = torch.optim.SGD(model[-1].parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        fxfreeze.compile(model, (torch.randn(2, 8),), optimizer=opt, policy="manual")
    assert "does not hold" in caplog.text and "0.weight" in caplog.text


def test_a_plan_of_another_model_merges_with_a_warning_or_is_refused_when_strict(caplog):
    small = fxfreeze.plan(zoo.resnet_cifar(depth=14), (torch.randn(2, 3, 16, 16),))  # 7 blocks
    big = zoo.resnet20()  # 10 blocks; the first blocks' start nodes exist in both graphs
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        try:
            fxfreeze.plan(big, (torch.randn(2, 3, 16, 16),), plan=small)
        except fxfreeze.PlanError:
            pass  # start nodes of the small model missing in the big one: refused anyway
    assert "does not match" in caplog.text or "not a compute node" in caplog.text
    edited = fxfreeze.plan(big, (torch.randn(2, 3, 16, 16),))
    d = edited.to_dict()
    del d["blocks"][3]  # merge layer1.2 into layer1.1
    merged = fxfreeze.FreezePlan.from_dict(d)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        p = fxfreeze.plan(big, (torch.randn(2, 3, 16, 16),), plan=merged)
    assert len(p.blocks) == 9 and "layer1.1, layer1.2" in caplog.text
    with pytest.raises(fxfreeze.PlanError, match="layer1.1, layer1.2"):
        fxfreeze.plan(big, (torch.randn(2, 3, 16, 16),), plan=merged, strict=True)


@pytest.mark.parametrize(
    "config, key",
    [
        ({"release_optimizer_state": "no"}, "release_optimizer_state"),
        ({"manual": {"schedule": {1.7: 2}}}, "manual.schedule"),
        ({"manual": {"schedule": {1: 2.9}}}, "manual.schedule"),
        ({"lr_change_factor": "abc"}, "lr_change_factor"),
        ({"steps_per_epoch": "x"}, "steps_per_epoch"),
        ({"egeria": 5}, "egeria"),
        ({"cache": {"memory_budget_mb": float("inf")}}, "cache.memory_budget_mb"),
        ({"cache": {"memory_budget_mb": float("nan")}}, "cache.memory_budget_mb"),
        ({"smartfrz": {"record_interval": 0}}, "smartfrz.record_interval"),
        ({"cache": {"enabled": "yes"}}, "cache.enabled"),
        ({"freezeout": {"t0": "half"}}, "freezeout.t0"),
        ({1: 2}, "not a name"),
    ],
)
def test_config_values_are_never_coerced(config, key):
    with pytest.raises(fxfreeze.ConfigError, match=key.replace(".", r"\.")):
        FreezeConfig.from_dict(config)


def test_a_schedule_beyond_the_plan_or_in_epochs_without_epochs_is_an_error():
    model = _mlp()
    with pytest.raises(fxfreeze.ConfigError, match=r"manual.schedule\[5\] asks for 99"):
        fxfreeze.compile(model, (torch.randn(2, 8),), config={"policy": "manual", "manual": {"schedule": {5: 99}}})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fm = fxfreeze.compile(model, (torch.randn(2, 8),), optimizer=opt,
                          config={"policy": "manual", "manual": {"schedule": {1: 2}, "unit": "epoch"}})
    fm(torch.randn(2, 8)).sum().backward()
    with pytest.raises(fxfreeze.ConfigError, match="steps_per_epoch"):
        opt.step()


def test_predictor_weights_with_nans_are_refused(tmp_path):
    from fxfreeze.runtime.predictor import FreezePredictor, load_predictor, save_predictor

    pred = FreezePredictor()
    with torch.no_grad():
        next(pred.parameters()).fill_(float("nan"))
    path = tmp_path / "nan.fxtf"
    save_predictor(pred, path, {})
    with pytest.raises(fxfreeze.PredictorError, match="NaN"):
        load_predictor(path)


def test_every_param_group_of_every_optimizer_is_watched():
    model = _mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": list(model[2:].parameters())}], lr=0.1, momentum=0.9)
    second = torch.optim.Adam(model[1].parameters(), lr=1e-3)  # the first block's parameters
    fm = fxfreeze.compile(model, (torch.randn(2, 8),), optimizer=[opt, second], policy="manual")
    x = torch.randn(4, 8)

    def step():
        opt.zero_grad()
        second.zero_grad()
        fm(x).sum().backward()
        opt.step()
        second.step()

    step()
    step()
    assert fm.freezer.step_count == 2  # the first optimizer is the clock
    opt.param_groups[1]["lr"] = 0.01  # a step in the second group only
    step()
    assert [e["action"] for e in fm.freezer.history] == ["lr_change"] and "param group 1" in fm.freezer.history[0]["reason"]
    for lr in (0.02, 0.04, 0.08):  # a warm-up ramp is not a decay step
        opt.param_groups[1]["lr"] = lr
        step()
    assert [e["action"] for e in fm.freezer.history] == ["lr_change"]
    in_second = [n for n in fm.frozen_parameter_names(fm.plan.max_frozen - 1) if n.startswith("1.")]
    assert in_second and all(fm.params_by_name[n] in second.state for n in in_second)  # Adam moments exist
    fm.freeze_prefix(fm.plan.max_frozen - 1)
    frozen = [fm.params_by_name[n] for n in fm.frozen_parameter_names()]
    assert not any(p in opt.state or p in second.state for p in frozen)  # released in both optimizers


def test_a_freezer_state_from_another_plan_is_refused_before_anything_changes():
    a = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), policy="manual")
    b = fxfreeze.compile(zoo.resnet20(), (torch.randn(2, 3, 16, 16),), policy="manual")
    b.freeze_prefix(2)
    with pytest.raises(fxfreeze.FreezeError, match="different plan"):
        a.freezer.load_state_dict(b.freezer.state_dict())
    assert a.num_frozen == 0
    state = a.freezer.state_dict()
    state["num_frozen"] = 2
    state["policy"] = {"applied": "corrupt"}  # a policy state that cannot load
    real = a.freezer.policy.load_state_dict

    def load(s):
        if s.get("applied") == "corrupt":
            raise ValueError("bad policy state")
        real(s)

    a.freezer.policy.load_state_dict = load
    with pytest.raises(fxfreeze.FreezeError, match="nothing was changed"):
        a.freezer.load_state_dict(state)
    assert a.num_frozen == 0 and all(p.requires_grad for p in a.parameters())


@pytest.mark.parametrize(
    "text, match",
    [
        (b"\xff\xfe\x00binary", "not UTF-8"),
        ("fxfreeze_plan: 1\nmodel: M\nstrategy: fx\nblocks:\n- {index: 0, name: a, start: [1, 2]}\nhead: {start: null}\n", "'start' must be str"),
        ("fxfreeze_plan: 1\nmodel: M\nstrategy: fx\nblocks: [{index: 0, name: a, start: x}]\nhead: {start: null}\nnotes: 3\n", "'notes'"),
    ],
)
def test_bad_plan_files_are_plan_errors(tmp_path, text, match):
    path = tmp_path / "plan.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(fxfreeze.PlanError, match=match):
        fxfreeze.FreezePlan.load(path)


@pytest.mark.parametrize(
    "args, match",
    [
        (["plan", "fxfreeze.zoo:resnet20", "--input-shape", "2,x"], "not a positive integer"),
        (["plan", "fxfreeze.zoo:resnet20", "--input-shape", "100000,3,1000,1000"], "too large"),
    ],
)
def test_cli_shapes_are_checked(args, match, capsys):
    assert cli_main(args) == 2
    assert match in capsys.readouterr().err


def test_cli_plan_output_into_a_missing_folder_is_one_line(tmp_path, capsys):
    rc = cli_main(["plan", "fxfreeze.zoo:resnet20", "--input-shape", "2,3,16,16", "-o", str(tmp_path / "no" / "p.yaml")])
    assert rc == 2 and "cannot write" in capsys.readouterr().err
    rc = cli_main(["plan", "fxfreeze.zoo:resnet20", "--input-shape", "2,3,16,16", "-o", str(tmp_path)])
    assert rc == 2 and "cannot write" in capsys.readouterr().err


def test_cli_does_not_put_the_working_directory_in_front_of_installed_modules(tmp_path, monkeypatch):
    from fxfreeze.cli import load_target

    monkeypatch.chdir(tmp_path)
    (tmp_path / "json.py").write_text("raise RuntimeError('shadowed')\n")  # would shadow the stdlib's json
    before = list(sys.path)
    load_target("fxfreeze.zoo:resnet20", None)
    load_target("fxfreeze.zoo:resnet20", None)
    assert sys.path[: len(before)] == before[: len(sys.path)] or sys.path[0] == before[0]
    assert sys.path.count(str(tmp_path)) <= 1


# -- faults that must not crash the loop ----------------------------------------------------------
class _Locked(nn.Module):
    """A leaf (no children) holding a lock: it cannot be deep-copied (Egeria copies blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16) / 4)
        self.lock = __import__("threading").Lock()

    def forward(self, x):
        return torch.relu(F.linear(x, self.weight))


def _egeria(model, **egeria):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = {"egeria": {"eval_interval": 1, "window": 3, "patience": 1, "asynchronous": False, "overhead_budget": 0.0, **egeria}}
    return fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt, config=cfg), opt


def _steps(fm, opt, n):
    for _ in range(n):
        opt.zero_grad()
        fm(torch.randn(8, 8)).pow(2).mean().backward()
        opt.step()


def test_egeria_with_a_block_that_cannot_be_copied_warns_and_training_goes_on(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), *[nn.Sequential(_Locked(), nn.Linear(16, 16)) for _ in range(3)], nn.Linear(16, 3))
    fm, opt = _egeria(model)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        _steps(fm, opt, 5)
    pol = fm.freezer.policy
    assert pol.unmeasurable and "has no reference" in caplog.text
    assert fm.num_frozen <= min(pol.unmeasurable)  # never past a block it cannot judge


def test_a_reference_job_that_hangs_is_given_up_with_a_warning(caplog):
    import time

    torch.manual_seed(0)
    fm, opt = _egeria(_mlp(), reference_timeout=0.5)
    pol = fm.freezer.policy
    pol._reference_job = lambda jobs, k: time.sleep(5)  # a job that does not come back in time
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        _steps(fm, opt, 4)
    assert pol.worker.disabled and "has not returned" in caplog.text
    assert fm.freezer.step_count == 4 and fm.num_frozen == 0
