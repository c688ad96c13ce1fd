"""The exception hierarchy of fxfreeze.

Every error the library raises on purpose derives from :class:`FxFreezeError`, so a
caller can catch one type. Messages name the node, key or file at fault and say what
to do about it; the CLI prints them as one line without a traceback.
"""

from __future__ import annotations

__all__ = [
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
]


class FxFreezeError(Exception):
    """Base class of every error raised by fxfreeze."""


class ModelError(FxFreezeError, TypeError):
    """The object given as a model cannot be used (not an nn.Module, no parameters...)."""


class TraceError(FxFreezeError):
    """No capture strategy could turn the model into a graph."""


class ExampleInputError(FxFreezeError, ValueError):
    """The example inputs do not fit the model (wrong shape, dtype or arity)."""


class CallError(FxFreezeError, TypeError):
    """A call of a compiled module does not fit the model's ``forward`` (the eager model
    would raise ``TypeError`` too); the message names the arguments."""


class PlanError(FxFreezeError, ValueError):
    """A freeze plan is malformed or does not match the model it is applied to."""


class ConfigError(FxFreezeError, ValueError):
    """A configuration value, key or file is invalid."""


class FreezeError(FxFreezeError, ValueError):
    """A freezing request cannot be carried out (e.g. a prefix beyond the plan)."""


class VizError(FxFreezeError):
    """A graph picture cannot be produced (unknown format, missing Graphviz...)."""


class DataError(FxFreezeError, ValueError):
    """A data file or folder (benchmarks, examples) is missing or malformed."""


class DistributedError(FxFreezeError, RuntimeError):
    """Distributed training cannot go on: the process group did not form, or a rank left."""


class PredictorError(FxFreezeError, RuntimeError):
    """The SmartFRZ predictor weights are missing, corrupt or do not fit (the message names
    the file and the command that regenerates it)."""


class PassError(FxFreezeError, RuntimeError):
    """A graph pass refused its input or failed (:func:`fxfreeze.passes.run_passes`). The
    message names the pass, the passes that ran before it and what went wrong; the
    original exception, if any, is its ``__cause__``."""

    def __init__(self, pass_name: str, before: list[str] | tuple[str, ...], detail: str) -> None:
        self.pass_name = pass_name
        self.before = tuple(before)
        after = f" (after {', '.join(self.before)})" if self.before else ""
        self.detail = detail
        super().__init__(f"graph pass {pass_name!r}{after}: {detail}")

    def __reduce__(self) -> tuple[type, tuple[str, tuple[str, ...], str]]:
        return (type(self), (self.pass_name, self.before, self.detail))


class CliError(FxFreezeError, ValueError):
    """A bad command-line argument (the ``fxfreeze`` command); the message names it."""


class CopyError(FxFreezeError, TypeError):
    """A compiled module was pickled or deep-copied. It drives a live run (the controller,
    its optimizer hook, background threads): save or copy the model and the freeze state."""
