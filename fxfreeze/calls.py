"""Calls of a model: example inputs in one form, equivalent calls in one canonical form,
and a one-line description for messages."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import ExampleInputError

__all__ = ["Inputs", "normalize_inputs", "canonical_call", "plain_mappings", "forward_signature", "describe_call"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def normalize_inputs(example_inputs: Any) -> Inputs:
    """Split example inputs into ``(args, kwargs)``.

    A tuple or list is positional, a dict is keyword (Hugging Face models are called as
    ``model(input_ids=..., attention_mask=...)``), a single tensor is one positional
    argument and ``None`` means no inputs.
    """
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise ExampleInputError(
                f"example_inputs dict keys must be argument names (str); got {bad[0]!r}"
            )
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ExampleInputError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of "
        f"keyword arguments; got {type(example_inputs).__name__}"
    )


def canonical_call(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One form for equivalent calls: ``m(x, mask=y)`` and ``m(input=x, mask=y)`` both
    become ``(x,), {"mask": y}`` (arguments that can be positional are positional until
    the first one left out; keyword arguments follow in the signature's order). Raises
    ``TypeError`` (the model's own complaint) when the call does not fit ``signature``."""
    if signature is None:
        return args, kwargs
    bound = signature.bind(*args, **kwargs)
    return bound.args, bound.kwargs


def _foreign_mapping(x: Any) -> bool:
    return isinstance(x, Mapping) and not isinstance(x, dict) and type(x) not in pytree.SUPPORTED_NODES


def plain_mappings(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call with each argument that is a mapping of a type graphs cannot take (a
    tokenizer's ``BatchEncoding``, a ``UserDict``) as a plain dict of the same items, so that
    ``model(tokenizer(texts, return_tensors="pt"))`` runs a graph like the same call with a
    dict. Other arguments are passed through; a call with none is returned as it is."""
    if not any(_foreign_mapping(a) for a in args) and not any(_foreign_mapping(v) for v in kwargs.values()):
        return args, kwargs
    plain = lambda x: dict(x) if _foreign_mapping(x) else x  # noqa: E731
    return tuple(plain(a) for a in args), {k: plain(v) for k, v in kwargs.items()}


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """``inspect.signature(model.forward)``, or None when it cannot be read."""
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def describe_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``"int64[2, 12], attention_mask=int64[2, 12]"``: a call's inputs in one line."""

    def d(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
        if x is None or isinstance(x, (bool, int, float)):
            return repr(x)
        return type(x).__name__

    parts = [d(a) for a in args] + [f"{k}={d(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no inputs"
