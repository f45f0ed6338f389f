"""Placement scheduler: filters, weighers and weighted DRF over numpy arrays; no libvirt, no database."""

from hvctl.scheduler.drf import DrfLedger, DrfOutcome, progressive_filling
from hvctl.scheduler.filters import (
    AntiAffinityFilter,
    CapacityFilter,
    GpuFilter,
    HostEnabledFilter,
    HostFilter,
    NumaFitFilter,
    default_filters,
)
from hvctl.scheduler.model import HostInventory, NumaCell, Placement, PlacementRequest, Resources
from hvctl.scheduler.placer import Scheduler, place, place_one
from hvctl.scheduler.weighers import PolicyMode, WeigherWeights

__all__ = [
    "AntiAffinityFilter",
    "CapacityFilter",
    "DrfLedger",
    "DrfOutcome",
    "GpuFilter",
    "HostEnabledFilter",
    "HostFilter",
    "HostInventory",
    "NumaCell",
    "NumaFitFilter",
    "Placement",
    "PlacementRequest",
    "PolicyMode",
    "Resources",
    "Scheduler",
    "WeigherWeights",
    "default_filters",
    "place",
    "place_one",
    "progressive_filling",
]
