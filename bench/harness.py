"""What the benchmarks share besides the load: child processes, ports, readiness, the report.

`Children` starts servers in their own process groups with logs in a temp dir and kills every
one of them on the way out (normal exit, exception, Ctrl-C or SIGTERM). The other helpers pick
free loopback ports, wait for a server's health URL, check one chat request end to end before
load is put on it, and print the results table.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from loadgen import GENERATORS, LoadResult, drive

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
HOST = "127.0.0.1"
MODEL = "bench-model"


def add_load_args(parser: argparse.ArgumentParser, concurrency: str) -> None:
    """The options every benchmark takes for how the load is driven."""
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds before each (default 1)")
    parser.add_argument("--concurrency", type=_int_list, default=_int_list(concurrency),
                        help=f"comma-separated connection counts (default {concurrency})")
    parser.add_argument("--generator", choices=GENERATORS, default="auto",
                        help="load generator: wrk when on PATH, else the built-in Python one (default auto)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers such as 1,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency values must be 1 or more")
    return values


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks (and child cleanup) run."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class Children:
    """Child servers that all die with the benchmark: use as a context manager."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Children:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], cwd: Path = REPO_ROOT) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        try:
            # A session of its own: Ctrl-C reaches only us, and we stop the whole group.
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def wait_ready(self, name: str, url: str, timeout: float = 60.0) -> None:
        """Poll `url` until it answers 200; fail early, with the log, if the child dies."""
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, http.client.HTTPException):  # not listening yet, or half up
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not answer {url} within {timeout:.0f} s:\n{self.log_tail(name)}")

    def stop_all(self, grace: float = 5.0) -> None:
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # the child leads its own group (start_new_session)


def start_fast_upstream(children: Children, port: int, name: str = "upstream") -> str:
    """Start bench/fast_upstream.py on `port`; returns its base URL (ending in /v1)."""
    children.start(name, [sys.executable, str(BENCH_DIR / "fast_upstream.py"), "--host", HOST,
                          "--port", str(port), "--model", MODEL])
    children.wait_ready(name, f"http://{HOST}:{port}/health")
    return f"http://{HOST}:{port}/v1"


def start_gateway(children: Children, data_dir: Path, upstream_base: str, port: int) -> tuple[str, str]:
    """Start the gateway in front of `upstream_base` and make a paying user for the load.

    Returns the gateway's base URL and that user's API key, so authentication, the rate limiter
    (set high enough never to refuse), pricing and usage accounting are all in the measured path.
    """
    admin_key = "sk-admin-bench-" + secrets.token_urlsafe(24)
    config = {"slots": {}, "upstreams": [{"name": "bench", "url": upstream_base, "models": [MODEL],
                                          "model_type": "text"}],
              "admin_key": admin_key, "rate_limits": {"payg": 10**9, "sub": 10**9},
              "pricing": {"input_per_1k": 0.0001, "output_per_1k": 0.0002}}
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    children.start("gateway", [sys.executable, "-m", "gateway", "serve", "--data-dir", str(data_dir),
                               "--host", HOST, "--port", str(port), "--log-level", "warning"])
    children.wait_ready("gateway", f"http://{HOST}:{port}/health")
    req = urllib.request.Request(f"http://{HOST}:{port}/admin/api/users", method="POST",
                                 data=json.dumps({"username": "bench", "tier": "payg", "balance": 10**9}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {admin_key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        user_key = str(json.loads(resp.read())["api_key"])
    return f"http://{HOST}:{port}/v1", user_key


def chat_body(model: str) -> bytes:
    """The non-streaming chat request every path gets, byte for byte."""
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": 8}, separators=(",", ":")).encode()


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def check_chat(url: str, body: bytes, headers: dict[str, str]) -> None:
    """One request before the load: a path that errors would otherwise benchmark its error page."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} answered {e.code}: {e.read()[:500].decode(errors='replace')}") from e
    if not isinstance(answer, dict) or not answer.get("choices"):
        raise RuntimeError(f"POST {url} did not answer a chat.completion: {str(answer)[:500]}")


def measure_paths(paths: dict[str, tuple[str, dict[str, str]]], body: bytes,
                  args: argparse.Namespace) -> list[tuple[str, LoadResult]]:
    """Check each path (name -> chat URL, headers) once, then drive each at every concurrency in `args`."""
    for name, (url, headers) in paths.items():
        check_chat(url, body, headers)
        print(f"{name:<12} {url}", flush=True)
    print()
    rows: list[tuple[str, LoadResult]] = []
    for conc in args.concurrency:
        for name, (url, headers) in paths.items():
            result = drive(url, body, headers, conc, args.duration, args.warmup, args.generator)
            print(f"  measured {name:<12} c={conc:<3} {fmt(result.rps, 0):>8} rps  p50 {fmt(result.p50_ms, 3)} ms",
                  flush=True)
            rows.append((name, result))
    return rows


def normalise_base(url: str) -> str:
    """`http://host:port`, `.../v1` or `.../v1/` all become `http://host:port/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def load_note() -> str:
    """The 1-minute load average against the core count: background work distorts every figure."""
    cores = os.cpu_count() or 1
    load1 = os.getloadavg()[0]
    note = f"{cores} cores, load average {load1:.2f}"
    if load1 > 0.5 * cores:
        note += " (busy: other work is running, figures will be lower and noisier)"
    return note


def fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def print_table(rows: list[tuple[str, LoadResult]]) -> None:
    header = f"{'path':<12} {'conc':>4} {'requests':>9} {'rps':>10} {'p50_ms':>8} {'p99_ms':>8} {'errors':>6}"
    print(header)
    print("-" * len(header))
    for path, r in rows:
        print(f"{path:<12} {r.concurrency:>4} {r.requests:>9,} {fmt(r.rps, 0):>10} {fmt(r.p50_ms, 3):>8} "
              f"{fmt(r.p99_ms, 3):>8} {r.errors:>6}")


def run_and_report(measure: Callable[[Path, Children], list[tuple[str, LoadResult]]],
                   summarize: Callable[[list[tuple[str, LoadResult]]], None]) -> int:
    """Run `measure` in a temp dir with its children stopped afterwards, then print the table and
    `summarize`'s lines. Returns the exit code: 130 on Ctrl-C, 1 when a path failed its check."""
    try:
        with tempfile.TemporaryDirectory(prefix="llm-gateway-bench-") as tmp, Children(Path(tmp)) as children:
            rows = measure(Path(tmp), children)
    except KeyboardInterrupt:
        print("\ninterrupted; child processes stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    print()
    print_table(rows)
    print()
    summarize(rows)
    print(f"\nmachine after: {load_note()}")
    return 0
