"""The one error of the export path (its own module, so every export module can raise it)."""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export check failed; nothing was written to the repository."""
