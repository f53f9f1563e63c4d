"""Supervisor: builds nothing, runs llama-server processes as slots on ports 4801-4807."""

from .manager import SlotError, Supervisor, find_llama_server
from .slot import Slot, SlotState, Timing
from .spec import MODEL_TYPES, SLOT_PORTS, PerformanceConfig, SlotConfig, SlotDefaults

__all__ = [
    "MODEL_TYPES", "SLOT_PORTS", "PerformanceConfig", "Slot", "SlotConfig", "SlotDefaults",
    "SlotError", "SlotState", "Supervisor", "Timing", "find_llama_server",
]
