"""fxfreeze: freeze converged layers during training, as a torch.fx compiler pass.

``fxfreeze.plan(model, example_inputs)`` finds a model's freezable blocks;
``fxfreeze.compile(model, example_inputs, optimizer=opt)`` returns a module that trains
exactly like ``model`` until its policy freezes a prefix of blocks, then skips their
backward pass.

Importing fxfreeze loads torch, numpy, networkx and PyYAML only; optional dependencies
(transformers, Graphviz, tqdm...) are imported where they are used.
"""

from __future__ import annotations

from .api import plan
from .errors import (
    CallError,
    CliError,
    ConfigError,
    CopyError,
    DataError,
    DistributedError,
    ExampleInputError,
    FreezeError,
    FxFreezeError,
    ModelError,
    PlanError,
    PredictorError,
    PassError,
    TraceError,
    VizError,
)
from .plan import Block, FreezePlan, Head
from .registry import register_policy
from .sample_ids import SAMPLE_ID_KEY, with_sample_ids

__version__ = "0.1.0"

__all__ = [
    "plan",
    "compile",
    "FreezePlan",
    "Block",
    "Head",
    "FreezeConfig",
    "register_policy",
    "with_sample_ids",
    "SAMPLE_ID_KEY",
    "FxFreezeError",
    "ModelError",
    "TraceError",
    "ExampleInputError",
    "CallError",
    "PlanError",
    "ConfigError",
    "FreezeError",
    "VizError",
    "DataError",
    "DistributedError",
    "PredictorError",
    "PassError",
    "CliError",
    "CopyError",
    "__version__",
]


def __getattr__(name: str):  # lazy: the runtime is only loaded when used
    if name == "compile":
        from .runtime.compile import compile as _compile

        return _compile
    if name == "FreezeConfig":
        from .config import FreezeConfig

        return FreezeConfig
    # the docs name ``fxfreeze.distributed.FreezeDDP`` and the like after ``import fxfreeze``
    # alone: a subpackage is imported when first reached (and its optional dependencies then)
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fxfreeze' has no attribute {name!r}")
