"""Child processes that cannot outlive the gateway.

Each llama-server runs in its own process group (so a stop reaches everything it started) and,
on Linux, with a parent-death signal (so it dies even when the gateway is killed with SIGKILL).
A pid file per slot lets the next start clean up after a machine without parent-death signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

import psutil

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout/stderr into `log`, in a new session, killed if we die.

    Must be called from the event-loop thread: Linux delivers the parent-death signal when
    the *thread* that forked exits, and the loop thread lives as long as the gateway.
    """
    kwargs: dict = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT}
    if sys.platform == "win32":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    else:
        kwargs["start_new_session"] = True
        if sys.platform.startswith("linux"):
            kwargs["preexec_fn"] = _die_with_parent
    return subprocess.Popen(argv, **kwargs)


async def wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait without blocking the loop: a pidfd on Linux, polling elsewhere."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None and proc.poll() is None:
        try:
            fd = pidfd_open(proc.pid)
        except OSError:
            fd = -1
        if fd >= 0:
            loop = asyncio.get_running_loop()
            exited = loop.create_future()
            loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
            try:
                await exited
            finally:
                loop.remove_reader(fd)
                os.close(fd)
    while proc.poll() is None:
        await asyncio.sleep(0.2)
    return proc.returncode


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if sys.platform == "win32":
            proc.kill() if sig == getattr(signal, "SIGKILL", None) else proc.terminate()
        else:
            os.killpg(proc.pid, sig)


async def terminate(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there after `grace` seconds."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(wait_exit(proc), grace)
        except TimeoutError:
            _signal_group(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
            await wait_exit(proc)
    elif sys.platform != "win32":
        _signal_group(proc, signal.SIGKILL)  # leader gone: make sure no stragglers remain


def port_in_use(port: int) -> bool:
    """True when something listens on 127.0.0.1:`port` (TIME_WAIT leftovers do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class PidFile:
    """`<run_dir>/slot-<port>.pid` holding "pid create_time" of the slot's llama-server."""

    def __init__(self, run_dir: Path, port: int) -> None:
        self.path = run_dir / f"slot-{port}.pid"

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(psutil.Error):
            self.path.write_text(f"{pid} {psutil.Process(pid).create_time()}\n")

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def kill_leftover(self) -> int | None:
        """Kill the llama-server a previous gateway left behind, if it is still that process."""
        try:
            pid_text, created = self.path.read_text().split()
            proc = psutil.Process(int(pid_text))
            same = abs(proc.create_time() - float(created)) < 1.0 and "llama-server" in proc.name()
        except (OSError, ValueError, psutil.Error):
            same, proc = False, None
        self.clear()
        if not same or proc is None:
            return None
        with contextlib.suppress(psutil.Error):
            proc.kill()
            proc.wait(5)
        return proc.pid
