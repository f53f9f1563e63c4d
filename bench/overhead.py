"""The gateway's overhead: the same load straight at a fast upstream and through the gateway.

Starts bench/fast_upstream.py and the gateway in front of it (temp data dir, free loopback
ports, a `payg` user whose key every gateway request carries, so authentication, rate limiting,
pricing and usage accounting are all measured), then drives non-streaming chat completions at
concurrency 1 and 16 on both paths and prints requests/s, p50 and p99 for each, the gateway/direct
ratios, the p50 the gateway adds, and how that compares with the targets (>= 3,000 rps at c=16,
<= 1 ms added p50 at c=1).
Every child process is stopped at the end, also on Ctrl-C or an error.

    .venv/bin/python bench/overhead.py [--duration 5] [--concurrency 1,16] [--generator auto|wrk|python]

Against a gateway that is already running (nothing is started but, with --upstream-port, the
fast upstream that gateway is configured to forward to):

    .venv/bin/python bench/overhead.py --gateway-url http://127.0.0.1:4000 --model NAME --api-key KEY
        [--upstream-port 8800 | --upstream-url http://127.0.0.1:8800/v1]

Without --upstream-port/--upstream-url only the gateway path is measured (no ratios then).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loadgen/harness, also under `python -m`

from harness import (  # noqa: E402
    MODEL,
    Children,
    add_load_args,
    auth_headers,
    chat_body,
    exit_on_sigterm,
    fmt,
    free_port,
    load_note,
    measure_paths,
    normalise_base,
    run_and_report,
    start_fast_upstream,
    start_gateway,
)
from loadgen import LoadResult, pick_generator  # noqa: E402

TARGET_RPS_C16 = 3000.0
TARGET_ADDED_P50_MS = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_args(parser, concurrency="1,16")
    parser.add_argument("--gateway-url", help="measure this running gateway instead of starting one")
    parser.add_argument("--model", default=MODEL, help="model name to ask for (default %(default)s)")
    parser.add_argument("--api-key", help="gateway key sent as Authorization: Bearer (with --gateway-url)")
    parser.add_argument("--upstream-url", help="with --gateway-url: an upstream already running, for the direct path")
    parser.add_argument("--upstream-port", type=int,
                        help="with --gateway-url: start the fast upstream on this port (the gateway's backend)")
    args = parser.parse_args(argv)
    if args.gateway_url is None and (args.upstream_url or args.upstream_port or args.api_key):
        parser.error("--upstream-url, --upstream-port and --api-key go with --gateway-url")
    if args.upstream_url and args.upstream_port:
        parser.error("give --upstream-url or --upstream-port, not both")
    return args


def run(args: argparse.Namespace, tmp: Path, children: Children) -> list[tuple[str, LoadResult]]:
    """Start what is needed, check every path once, then measure them all; returns the rows."""
    upstream: str | None = None  # the direct path; None when only a running gateway is measured
    if args.gateway_url is None:
        upstream = start_fast_upstream(children, free_port())
        gateway, args.api_key = start_gateway(children, tmp / "data", upstream, free_port())
    else:
        gateway = normalise_base(args.gateway_url)
        if args.upstream_url:
            upstream = normalise_base(args.upstream_url)
        elif args.upstream_port:
            upstream = start_fast_upstream(children, args.upstream_port)
    body = chat_body(args.model)
    paths: dict[str, tuple[str, dict[str, str]]] = {"gateway": (gateway + "/chat/completions",
                                                                auth_headers(args.api_key))}
    if upstream is not None:
        paths = {"direct": (upstream + "/chat/completions", {}), **paths}  # never send the gateway key on
    return measure_paths(paths, body, args)


def print_summary(rows: list[tuple[str, LoadResult]]) -> None:
    by_key = {(name, r.concurrency): r for name, r in rows}
    for conc in sorted({r.concurrency for _, r in rows}):
        direct, via = by_key.get(("direct", conc)), by_key.get(("gateway", conc))
        if direct and via:
            ratio = via.rps / direct.rps if direct.rps else math.nan
            print(f"c={conc:<3} gateway/direct rps {fmt(ratio, 2)}x   added p50 {fmt(via.p50_ms - direct.p50_ms, 3)} ms"
                  f"   added p99 {fmt(via.p99_ms - direct.p99_ms, 3)} ms")
    print()
    print("targets:")
    c16 = by_key.get(("gateway", 16))
    if c16:
        verdict = "met" if c16.rps >= TARGET_RPS_C16 else "NOT met"
        print(f"  gateway rps at c=16     {fmt(c16.rps, 0):>8}     (target >= {TARGET_RPS_C16:,.0f})   {verdict}")
    else:
        print("  gateway rps at c=16     not measured (add 16 to --concurrency)")
    direct1, via1 = by_key.get(("direct", 1)), by_key.get(("gateway", 1))
    if direct1 and via1:
        added = via1.p50_ms - direct1.p50_ms
        verdict = "met" if added <= TARGET_ADDED_P50_MS else "NOT met"
        print(f"  added p50 at c=1        {fmt(added, 3):>8} ms  (target <= {TARGET_ADDED_P50_MS:g} ms)     {verdict}")
    else:
        print("  added p50 at c=1        not measured (needs c=1 and a direct path)")
    if any(r.errors for _, r in rows):
        print("warning: some requests failed (see the errors column); their paths are not comparable")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    generator = pick_generator(args.generator)
    print(f"llm-gateway overhead benchmark: non-streaming chat, {args.duration:g} s per measurement "
          f"after {args.warmup:g} s warm-up")
    print(f"load generator: {generator}" + ("" if generator == "wrk" else " (built-in aiohttp; install wrk for "
                                               "higher ceilings)"))
    print(f"machine: {load_note()}", flush=True)
    args.generator = generator
    def summarize(rows: list[tuple[str, LoadResult]]) -> None:
        print_summary(rows)
        print("note: the load generator, the upstream and the gateway share this machine's cores.")
    return run_and_report(lambda tmp, children: run(args, tmp, children), summarize)

if __name__ == "__main__":
    sys.exit(main())
