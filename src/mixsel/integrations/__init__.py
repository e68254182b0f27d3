"""Integrations with other training stacks.

``mixsel.integrations.hf``: :class:`SelectionTrainer` (a ``transformers.Trainer``),
:class:`SelectionTrainingArguments` (``TrainingArguments``) and :class:`ReweightingCallback`.
``mixsel.integrations.trl``: :class:`SelectionSFTTrainer` (TRL's ``SFTTrainer``) and
:class:`SelectionSFTConfig` (``SFTConfig``), ``pip install "mixsel[trl]"``. Importing this package is
cheap; ``transformers`` / ``trl`` are imported on first use of those names.
"""

from __future__ import annotations

from typing import Any

_HF = ("ReweightingCallback", "SelectionTrainer", "SelectionTrainingArguments")
_TRL = ("SelectionSFTConfig", "SelectionSFTTrainer")
__all__ = [*_HF, *_TRL]


def __getattr__(name: str) -> Any:
    if name in _HF:
        from mixsel.integrations import hf

        return getattr(hf, name)
    if name in _TRL:
        from mixsel.integrations import trl

        return getattr(trl, name)
    raise AttributeError(f"module 'mixsel.integrations' has no attribute {name!r}")
