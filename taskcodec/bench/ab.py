"""Before/after comparisons on a shared machine: an older copy of a module loaded beside the current one, and rounds
whose order alternates (A B, B A, ...) so that load from other jobs hits both sides alike."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable, TypeVar

T = TypeVar("T")


def load_module_copy(name: str, path: str | Path) -> ModuleType:
    """Import the Python file ``path`` as module ``name`` (registered in sys.modules: dataclasses look their module
    up), independent of the installed module it is a copy of."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def abba(items: Iterable[T], round_index: int) -> list[T]:
    """The items in their order in even rounds, reversed in odd ones."""
    items = list(items)
    return items if round_index % 2 == 0 else items[::-1]
