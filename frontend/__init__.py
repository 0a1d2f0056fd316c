"""The `.dsv3` language: grammar, parser to a typed spec, and the builder from spec to dsv3 IR."""

from .errors import SpecError
from .parser import load, parse

__all__ = ["SpecError", "load", "parse"]
