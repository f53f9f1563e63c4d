"""The supervisor: owns the seven slot ports, loads and unloads models into them.

Changes to which model sits in which slot are reported through `on_change`, so whoever owns
`config.json` (the gateway) can persist them; the supervisor itself knows nothing of the file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .process import PidFile
from .slot import DEFAULT_TIMING, Slot, SlotState, Timing
from .spec import EMBEDDING_TYPES, MMPROJ_TYPES, MODEL_TYPES, SLOT_PORTS, SlotConfig, SlotDefaults

log = logging.getLogger("supervisor")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class SlotError(Exception):
    """A load or unload request that cannot be carried out; the message says why."""


def find_llama_server(configured: str | None = None) -> Path | None:
    """`LLAMA_SERVER_BIN`, then the configured path, then build/bin, then $PATH."""
    exe = "llama-server.exe" if sys.platform == "win32" else "llama-server"
    for candidate in (os.environ.get("LLAMA_SERVER_BIN"), configured, str(PROJECT_ROOT / "build" / "bin" / exe)):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    found = shutil.which(exe)
    return Path(found) if found else None


class Supervisor:
    def __init__(
        self,
        data_dir: Path,
        defaults: SlotDefaults,
        binary: Path | None,
        on_change: Callable[[dict[int, SlotConfig | None]], None] | None = None,
        timing: Timing = DEFAULT_TIMING,
        on_state: Callable[[int, SlotState], None] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.defaults = defaults
        self.binary = binary
        self.on_change = on_change  # which model is in which slot changed (persist it)
        self.on_state = on_state  # a slot went loading/ready/restarting/failed/stopped
        self.timing = timing
        self.slots: dict[int, Slot] = {}
        self._http: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    async def start(self, configured: dict[int, SlotConfig | None]) -> None:
        """Clean up after a previous gateway, then start every configured slot."""
        self._http = aiohttp.ClientSession()
        for port in SLOT_PORTS:
            killed = await asyncio.to_thread(PidFile(self.run_dir, port).kill_leftover)
            if killed:
                log.warning("slot %d: killed llama-server pid %d left over from a previous run", port, killed)
        for port, slot_config in configured.items():
            if slot_config is not None:
                try:
                    await self.load(port, slot_config, persist=False)
                except SlotError as e:
                    log.error("slot %d not started: %s", port, e)

    async def stop(self) -> None:
        await asyncio.gather(*(slot.stop() for slot in self.slots.values()))
        self.slots.clear()
        if self._http is not None:
            await self._http.close()

    def validate(self, port: int, config: SlotConfig) -> None:
        if port not in SLOT_PORTS:
            raise SlotError(f"slot port {port} is outside {SLOT_PORTS.start}-{SLOT_PORTS.stop - 1}")
        if config.model_type not in MODEL_TYPES:
            raise SlotError(f"model_type {config.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        if not self.defaults.resolve(config.model_path).is_file():
            raise SlotError(f"model file not found: {config.model_path}")
        if config.mmproj and not self.defaults.resolve(config.mmproj).is_file():
            raise SlotError(f"mmproj file not found: {config.mmproj}")
        if config.model_type in MMPROJ_TYPES - EMBEDDING_TYPES and not config.mmproj:
            log.warning("slot %d: %s model without an mmproj projector will not see images", port, config.model_type)
        if self.binary is None:
            raise SlotError("llama-server binary not found: run ./build_llamacpp.sh (or set LLAMA_SERVER_BIN)")

    async def load(self, port: int, config: SlotConfig, *, persist: bool = True) -> Slot:
        """Start `config` in slot `port`; refuses a busy slot."""
        async with self._lock:
            self.validate(port, config)
            if port in self.slots:
                raise SlotError(f"slot {port} is busy with {self.slots[port].config.display_name}; unload it first")
            assert self._http is not None, "Supervisor.start() was not called"
            slot = Slot(port, config, self.defaults, self.binary, self.log_dir, self.run_dir,  # type: ignore[arg-type]
                        self._http, self.timing)
            slot.on_state = self.on_state
            self.slots[port] = slot
            slot.start()
        if persist:
            self._changed()
        return slot

    async def unload(self, port: int, *, persist: bool = True) -> None:
        async with self._lock:
            slot = self.slots.pop(port, None)
        if slot is None:
            raise SlotError(f"slot {port} is empty")
        await slot.stop()
        if persist:
            self._changed()

    def ready_slots(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.state is SlotState.READY]

    def status(self) -> list[dict[str, Any]]:
        return [self.slots[p].status() for p in sorted(self.slots)]

    def _changed(self) -> None:
        if self.on_change is not None:
            current: dict[int, SlotConfig | None] = {p: None for p in SLOT_PORTS}
            current.update({p: s.config for p, s in self.slots.items()})
            self.on_change(current)
