"""Selection methods: a registry with one small module per method (registration order is display order)."""

# isort: off
from altrack.selection import coreset, kcenter, uncertainty, random  # noqa: F401  (registers)

# isort: on
from altrack.selection.base import SelectionContext, SelectionResult, Selector
from altrack.selection.registry import available_methods, get_selector

__all__ = ["SelectionContext", "SelectionResult", "Selector", "available_methods", "get_selector"]
