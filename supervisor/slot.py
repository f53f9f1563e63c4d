"""One supervised llama-server: start, wait for health, watch, restart with backoff, stop.

States: `loading` (process started, /health not yet 200), `ready`, `restarting` (crashed,
waiting out the backoff), `failed` (gave up after repeated crashes), `stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from . import process
from .spec import SlotConfig, SlotDefaults, llama_server_args

log = logging.getLogger("supervisor")


class SlotState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Timing:
    """How patient the supervisor is; tests shorten these."""

    load_timeout: float = 600.0  # seconds a model may take to answer /health
    health_interval: float = 5.0  # seconds between health checks of a ready slot
    health_failures: int = 3  # consecutive failed checks before a restart
    backoff_first: float = 0.5
    backoff_max: float = 30.0
    max_failures: int = 5  # crashes in a row (without a healthy minute) before `failed`
    stable_after: float = 60.0  # a slot ready this long has its crash streak forgiven
    stop_grace: float = 5.0


DEFAULT_TIMING = Timing()
# A slot's log past this size is moved to `slot-<port>.log.1` (replacing the older one): two parts at most on disk.
LOG_MAX_BYTES = 32 * 2**20


class Slot:
    def __init__(
        self,
        port: int,
        config: SlotConfig,
        defaults: SlotDefaults,
        binary: Path,
        log_dir: Path,
        run_dir: Path,
        http: aiohttp.ClientSession,
        timing: Timing,
    ) -> None:
        self.port = port
        self.config = config
        self.defaults = defaults
        self.binary = binary
        self.log_path = log_dir / f"slot-{port}.log"
        self.pidfile = process.PidFile(run_dir, port)
        self.http = http
        self.timing = timing
        self.on_state: Callable[[int, SlotState], None] | None = None
        self._state = SlotState.STOPPED
        self.restarts = 0
        self.last_error: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()

    # --- public --------------------------------------------------------------------------
    @property
    def state(self) -> SlotState:
        return self._state

    @state.setter
    def state(self, value: SlotState) -> None:
        if value is not self._state:
            self._state = value
            if self.on_state is not None:
                self.on_state(self.port, value)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    @property
    def is_ready(self) -> bool:
        return self.state is SlotState.READY

    def start(self) -> None:
        if self._task is None or self._task.done():
            self.state = SlotState.LOADING
            self._ready_event.clear()
            self._task = asyncio.create_task(self._run(), name=f"slot-{self.port}")

    async def wait_ready(self, timeout: float | None = None) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready_event.wait(), timeout)
        return self.is_ready

    async def stop(self) -> None:
        """Stop supervising and terminate the process (SIGTERM, then SIGKILL)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._kill_process()
        self.state = SlotState.STOPPED
        self._ready_since = None

    def status(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "name": self.config.display_name,
            "model_path": self.config.model_path,
            "model_type": self.config.model_type,
            "state": self.state.value,
            "pid": self.pid,
            "uptime_s": round(time.monotonic() - self._ready_since, 1) if self._ready_since else 0.0,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "log_path": str(self.log_path),
        }

    # --- supervision loop ------------------------------------------------------------------
    async def _run(self) -> None:
        crashes = 0
        while True:
            started = time.monotonic()
            self.state = SlotState.LOADING
            healthy = False
            try:
                await self._spawn()
                healthy = await self._wait_healthy()
                if healthy:
                    self._set_ready()
                    await self._watch()
            except OSError as e:  # the binary would not start, or the port is taken
                self.last_error = str(e)
            finally:
                self._ready_event.clear()
                self._ready_since = None
            await self._kill_process()
            if healthy and time.monotonic() - started > self.timing.stable_after:
                crashes = 0
            crashes += 1
            self.restarts += 1
            if self.last_error is None:
                self.last_error = self._log_tail()
            if crashes >= self.timing.max_failures:
                self.state = SlotState.FAILED
                log.error("slot %d: giving up after %d failed starts: %s", self.port, crashes, self.last_error)
                self._ready_event.set()  # wake waiters: the answer is "not ready"
                return
            delay = min(self.timing.backoff_max, self.timing.backoff_first * 2 ** (crashes - 1))
            self.state = SlotState.RESTARTING
            log.warning("slot %d: llama-server went down (%s); restart %d in %.1fs",
                        self.port, self.last_error, self.restarts, delay)
            await asyncio.sleep(delay)

    async def _spawn(self) -> None:
        self.last_error = None
        if process.port_in_use(self.port):
            # Never mistake someone else's server on our port for our slot being ready.
            raise OSError(f"port {self.port} is already in use by another program")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(self.binary), *llama_server_args(self.port, self.config, self.defaults)]
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            log_file.flush()
            self._proc = process.spawn(argv, log_file)
        self.pidfile.write(self._proc.pid)
        log.info("slot %d: started llama-server pid %d for %s (%s)",
                 self.port, self._proc.pid, self.config.display_name, self.config.model_type)

    async def _health_ok(self, timeout: float) -> bool:
        try:
            async with self.http.get(f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _wait_healthy(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.timing.load_timeout
        exited = asyncio.create_task(process.wait_exit(self._proc))
        try:
            while time.monotonic() < deadline:
                if await self._health_ok(timeout=2.0):
                    return True
                if exited.done():
                    self.last_error = f"exited with code {exited.result()} while loading: {self._log_tail()}"
                    return False
                await asyncio.wait({exited}, timeout=0.25)
            self.last_error = f"not healthy after {self.timing.load_timeout:.0f}s"
            return False
        finally:
            exited.cancel()

    def _set_ready(self) -> None:
        self.state = SlotState.READY
        self._ready_since = time.monotonic()
        self._ready_event.set()
        log.info("slot %d: ready (%s)", self.port, self.config.display_name)

    async def _watch(self) -> None:
        """Return when the process exits or stops answering /health."""
        assert self._proc is not None
        exited = asyncio.create_task(process.wait_exit(self._proc))
        failures = 0
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=self.timing.health_interval)
                if done:
                    self.last_error = f"exited with code {exited.result()}"
                    return
                failures = 0 if await self._health_ok(timeout=self.timing.health_interval) else failures + 1
                if failures >= self.timing.health_failures:
                    self.last_error = f"/health failed {failures} times in a row"
                    return
                await self._rotate_log_if_big()
        finally:
            exited.cancel()

    async def _rotate_log_if_big(self) -> None:
        """llama-server holds its log open (append mode) for as long as it runs, so the log is copied aside and
        truncated in place rather than renamed; lines written between the copy and the truncation are lost."""
        try:
            if self.log_path.stat().st_size <= LOG_MAX_BYTES:
                return
        except OSError:
            return
        await asyncio.to_thread(_copy_then_truncate, self.log_path, self.log_path.with_name(self.log_path.name + ".1"))

    async def _kill_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await process.terminate(proc, self.timing.stop_grace)
        self.pidfile.clear()

    def _log_tail(self, limit: int = 600) -> str:
        """The end of the slot's log: llama-server says there why it would not start."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - limit))
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-4:])


def _copy_then_truncate(path: Path, older: Path) -> None:
    try:
        shutil.copyfile(path, older)
        os.truncate(path, 0)
    except OSError as e:
        log.warning("could not rotate %s: %s", path, e)
