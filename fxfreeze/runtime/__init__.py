"""Stateful training-time objects: the compiled module, the controller and policies.
May import :mod:`fxfreeze.passes`; never the reverse."""

from .controller import Freezer
from .compile import compile
from .module import FreezableModule

__all__ = ["FreezableModule", "Freezer", "compile"]
