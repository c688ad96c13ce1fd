"""FreezeConfig validation, YAML files, the manual and freezeout policies."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import fxfreeze
from fxfreeze.registry import unregister_policy
from fxfreeze import zoo
from fxfreeze.config import FreezeConfig
from fxfreeze.config_checks import positive_int
from fxfreeze.runtime.policies import Decision, Policy
from fxfreeze.runtime.policies.freezeout import freeze_times


def test_unknown_key_names_key_and_allowed(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("policy: manual\nlr_chnage_factor: 2\n")
    with pytest.raises(fxfreeze.ConfigError) as e:
        fxfreeze.compile(zoo.resnet20(), config=str(path))
    assert "lr_chnage_factor" in str(e.value) and "lr_change_factor" in str(e.value) and "cfg.yaml" in str(e.value)


def test_unknown_nested_key():
    with pytest.raises(fxfreeze.ConfigError, match="'t_0'.*freezeout"):
        FreezeConfig.from_dict({"freezeout": {"t_0": 0.3}})


def test_unknown_policy_lists_valid_names():
    with pytest.raises(fxfreeze.ConfigError, match="valid names: autofreeze, egeria, freezeout, manual, smartfrz"):
        fxfreeze.compile(zoo.resnet20(), policy="frezeout")


def test_egeria_is_the_default_and_its_config_is_validated():
    fm = fxfreeze.compile(zoo.resnet20())
    assert fm.freezer.config.policy == "egeria"
    fm.freezer.detach()
    for bad, match in (
        ({"window": 2}, "egeria.window"),
        ({"threshold": 0}, "egeria.threshold"),
        ({"reference_precision": "int4"}, "egeria.reference_precision"),
        ({"unfreeze_on_lr_change": "some"}, "egeria.unfreeze_on_lr_change"),
        ({"overhead_budget": 1.5}, "egeria.overhead_budget"),
        ({"asynchronous": "yes"}, "egeria.asynchronous"),
        ({"eval_intervall": 5}, "unknown key 'eval_intervall'"),
    ):
        with pytest.raises(fxfreeze.ConfigError, match=match):
            FreezeConfig.from_dict({"egeria": bad})


def test_bad_config_changes_nothing():
    model = zoo.resnet20()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(fxfreeze.ConfigError):
        fxfreeze.compile(model, config={"manual": {"schedule": {"x": 1}}})
    assert [p.requires_grad for p in model.parameters()] == flags


def test_round_trip_dict_and_yaml(tmp_path):
    cfg = FreezeConfig(policy="freezeout", freezeout={"t0": 0.4, "total_steps": 100})
    assert FreezeConfig.from_dict(cfg.to_dict()) == cfg
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert FreezeConfig.from_yaml(p) == cfg


def test_manual_schedule_by_step_runs_from_optimizer_hook():
    model = zoo.resnet20(num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    fm = fxfreeze.compile(model, (x,), optimizer=opt, config={"policy": "manual", "manual": {"schedule": {2: 2, 4: 5}}})
    seen = []
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(fm(x), y).backward()
        opt.step()
        seen.append(fm.num_frozen)
    assert seen == [0, 2, 2, 5, 5]


def test_freezeout_times_and_policy():
    assert freeze_times(4, 0.5, "linear", 100) == [50, 62, 75, 88]
    assert freeze_times(2, 0.5, "cubic", 1000) == [125, 422]
    model = zoo.resnet20(num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fm = fxfreeze.compile(model, config={"policy": "freezeout", "freezeout": {"t0": 0.5, "scaling": "linear", "total_steps": 20}}, optimizer=opt)
    ks = []
    for _ in range(20):
        fm.freezer.step()
        ks.append(fm.num_frozen)
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == fm.plan.max_frozen


def test_freezeout_requires_total_steps():
    with pytest.raises(fxfreeze.ConfigError, match="total_steps"):
        fxfreeze.compile(zoo.resnet20(), policy="freezeout")


def test_lr_change_is_reported():
    model = zoo.resnet20()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fm = fxfreeze.compile(model, optimizer=opt)
    fm.freezer.step()
    opt.param_groups[0]["lr"] = 0.01
    fm.freezer.step()
    assert fm.freezer.history[-1]["action"] == "lr_change"


def test_load_state_for_other_plan_is_rejected():
    a = fxfreeze.compile(zoo.resnet20())
    b = fxfreeze.compile(zoo.resnet56())
    with pytest.raises(fxfreeze.FreezeError, match="different plan"):
        b.freezer.load_state_dict(a.freezer.state_dict())


# -- a policy from outside the package: selected and configured like a built-in one ------------------
@dataclass
class _AtStepConfig:
    at: int = 10
    blocks: int = 1

    def __post_init__(self) -> None:
        positive_int(self.at, "at_step.at")
        positive_int(self.blocks, "at_step.blocks")


class _AtStepPolicy(Policy):
    """Freezes ``blocks`` blocks once ``at`` steps have run."""

    def decide(self, signals):
        cfg = self.config.section("at_step")
        if signals.step >= cfg.at and signals.num_frozen < cfg.blocks:
            return Decision(cfg.blocks, f"at step {cfg.at}")
        return None


def test_a_policy_registered_from_outside_is_selected_and_configured_from_yaml(tmp_path):
    fxfreeze.register_policy("at_step", _AtStepPolicy, _AtStepConfig, replace=True)
    path = tmp_path / "cfg.yaml"
    path.write_text("policy: at_step\nat_step:\n  at: 3\n  blocks: 2\n")
    cfg = FreezeConfig.from_yaml(path)
    assert cfg.section("at_step") == _AtStepConfig(at=3, blocks=2)
    assert FreezeConfig.from_yaml(path).to_dict()["at_step"] == {"at": 3, "blocks": 2}  # round trip
    model = zoo.resnet20()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fm = fxfreeze.compile(model, (torch.randn(2, 3, 16, 16),), optimizer=opt, config=str(path))
    for _ in range(4):
        opt.zero_grad()
        fm(torch.randn(2, 3, 16, 16)).sum().backward()
        opt.step()
    assert [(e["step"], e["num_frozen"]) for e in fm.freezer.history] == [(3, 2)]
    with pytest.raises(fxfreeze.ConfigError, match="unknown key 'bogus' in config section 'at_step'"):
        FreezeConfig.from_dict({"policy": "at_step", "at_step": {"bogus": 1}})
    with pytest.raises(fxfreeze.ConfigError, match="at_step.at"):
        FreezeConfig.from_dict({"policy": "at_step", "at_step": {"at": "soon"}})
    with pytest.raises(fxfreeze.ConfigError, match="already registered"):
        fxfreeze.register_policy("at_step", _AtStepPolicy, _AtStepConfig)
    fm.freezer.detach()
    unregister_policy("at_step")
    with pytest.raises(fxfreeze.ConfigError, match="unknown policy 'at_step'"):
        FreezeConfig(policy="at_step")
    with pytest.raises(fxfreeze.ConfigError, match="cannot be unregistered"):
        unregister_policy("egeria")
