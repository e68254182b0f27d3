"""Integrations with other training stacks.

``mixsel.integrations.hf``: :class:`SelectionTrainer` (a ``transformers.Trainer``),
:class:`SelectionTrainingArguments` (``TrainingArguments``) and :class:`ReweightingCallback`. Importing this
package is cheap; ``transformers`` is imported on first use of those names.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ReweightingCallback", "SelectionTrainer", "SelectionTrainingArguments"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mixsel.integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'mixsel.integrations' has no attribute {name!r}")
