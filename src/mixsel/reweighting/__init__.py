"""Reweighters: one module per method, each registered by name (see ``mixsel.registry``)."""

from mixsel.reweighting.base import Mode, Reweighter
from mixsel.reweighting.doge import DoGEReweighter
from mixsel.reweighting.dograph import DoGraphReweighter
from mixsel.reweighting.doremi import DoReMiReweighter
from mixsel.reweighting.static import StaticReweighter, temperature_weights
from mixsel.reweighting.uniform import UniformReweighter

__all__ = [
    "DoGEReweighter",
    "DoGraphReweighter",
    "DoReMiReweighter",
    "Mode",
    "Reweighter",
    "StaticReweighter",
    "UniformReweighter",
    "temperature_weights",
]
