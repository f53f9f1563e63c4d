"""Driving HTTP load at one URL and reporting requests/s and latency percentiles.

`drive()` is the one entry point the benchmarks use: it runs `wrk` when it is on PATH (a Lua
script supplies the POST body and headers and prints exact p50/p99 from wrk's histogram in its
`done` hook) and otherwise a built-in aiohttp load generator in a separate process (this file
run as a script), so the load never shares an event loop with the benchmark driver. Both run a
short warm-up that is not counted, then a fixed-duration measurement with N concurrent
keep-alive connections, each sending its next request as soon as the previous answer is read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

GENERATORS = ("auto", "wrk", "python")


@dataclass
class LoadResult:
    """One measurement: successful requests only count towards rps and percentiles."""

    generator: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int  # non-2xx answers, socket errors and timeouts
    rps: float
    p50_ms: float
    p99_ms: float


def pick_generator(choice: str = "auto") -> str:
    """`wrk` when asked for or found on PATH, else `python`; asking for a missing wrk is an error."""
    if choice not in GENERATORS:
        raise ValueError(f"generator must be one of {', '.join(GENERATORS)}")
    if choice == "python":
        return "python"
    if shutil.which("wrk"):
        return "wrk"
    if choice == "wrk":
        raise RuntimeError("wrk is not on PATH (Debian/Ubuntu: apt-get install -y wrk)")
    return "python"


def drive(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float,
          warmup: float, generator: str = "auto") -> LoadResult:
    """POST `body` to `url` from `concurrency` connections for `duration` seconds after a warm-up."""
    gen = pick_generator(generator)
    if gen == "wrk":
        return _drive_wrk(url, body, headers, concurrency, duration, warmup)
    return _drive_python(url, body, headers, concurrency, duration, warmup)


# --- wrk ------------------------------------------------------------------------------------
_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH_RESULT %d %d %d %d %.3f %.3f\\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def _lua_string(data: bytes) -> str:
    """A quoted Lua string holding exactly `data` (quotes, backslashes and non-ASCII as \\ddd)."""
    out: list[str] = []
    for byte in data:
        char = chr(byte)
        out.append(char if 32 <= byte < 127 and char not in '"\\' else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def _wrk_script(body: bytes, headers: dict[str, str]) -> str:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    for name, value in {"Content-Type": "application/json", **headers}.items():
        lines.append(f"wrk.headers[{_lua_string(name.encode())}] = {_lua_string(value.encode())}")
    return "\n".join(lines) + "\n" + _WRK_DONE


def _run_wrk(url: str, script: Path, concurrency: int, seconds: float) -> subprocess.CompletedProcess[str]:
    threads = max(1, min(concurrency, os.cpu_count() or 1))
    cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "--latency", "-s", str(script), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    if proc.returncode != 0 or proc.stderr.strip():  # a Lua error still exits 0, and sends GETs
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _drive_wrk(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float,
               warmup: float) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_wrk_script(body, headers), encoding="utf-8")
        if warmup > 0:
            _run_wrk(url, script, concurrency, warmup)
        proc = _run_wrk(url, script, concurrency, duration)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            requests, duration_us, bad_status, socket_errors, p50_us, p99_us = line.split()[1:]
            seconds = int(duration_us) / 1e6
            ok = max(0, int(requests) - int(bad_status))  # wrk counts non-2xx answers as requests too
            errors = int(bad_status) + int(socket_errors)
            return LoadResult("wrk", concurrency, seconds, ok, errors, ok / seconds,
                              float(p50_us) / 1000, float(p99_us) / 1000)
    raise RuntimeError(f"wrk printed no result:\n{proc.stdout}\n{proc.stderr}")


# --- built-in Python generator (runs in its own process) ------------------------------------
def _drive_python(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float,
                  warmup: float) -> LoadResult:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--url", url, "--body", body.decode(),
           "--headers", json.dumps(headers), "--concurrency", str(concurrency),
           "--duration", str(duration), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"python load generator failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return LoadResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


async def _python_load(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float,
                       warmup: float) -> LoadResult:
    import aiohttp

    send_headers = {"Content-Type": "application/json", **headers}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     skip_auto_headers=("User-Agent",)) as session:
        clock = time.perf_counter
        measure_from = clock() + warmup
        stop_at = measure_from + duration
        last_end = measure_from

        async def worker() -> None:
            nonlocal errors, last_end
            while (started := clock()) < stop_at:
                try:
                    async with session.post(url, data=body, headers=send_headers) as resp:
                        await resp.read()
                        ok = 200 <= resp.status < 300
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                ended = clock()
                if started >= measure_from:
                    last_end = max(last_end, ended)
                    if ok:
                        latencies.append(ended - started)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = max(last_end - measure_from, 1e-9)
    latencies.sort()
    return LoadResult("python", concurrency, seconds, len(latencies), errors, len(latencies) / seconds,
                      _percentile(latencies, 50) * 1000, _percentile(latencies, 99) * 1000)


def main(argv: list[str] | None = None) -> int:
    """The separate-process side of the Python generator: prints one LoadResult as JSON."""
    parser = argparse.ArgumentParser(description="built-in load generator (used when wrk is absent)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="the JSON request body")
    parser.add_argument("--headers", default="{}", help="extra request headers as a JSON object")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    coro = _python_load(args.url, args.body.encode(), json.loads(args.headers), args.concurrency,
                        args.duration, args.warmup)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
