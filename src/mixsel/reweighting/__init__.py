"""Reweighters: one module per method, each registered by name (see ``mixsel.registry``)."""

from mixsel.reweighting.base import Mode, Reweighter

__all__ = ["Mode", "Reweighter"]
