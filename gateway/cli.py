"""`llm-gateway` command line: `serve`, `build` (llama-server), `users` and `usage`."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from supervisor.manager import PROJECT_ROOT

from . import cli_accounts
from .config import ConfigError, load_config
from .observability import JSONFormatter


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .default_model import ensure_config

    data_dir = Path(args.data_dir).resolve()
    try:
        config = load_config(ensure_config(data_dir))
    except ConfigError as e:
        print(f"llm-gateway: invalid config: {e}", file=sys.stderr)
        return 2
    app = create_app(config, data_dir)
    print(f"[llm-gateway] serving on http://{args.host}:{args.port} (data dir {data_dir})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                timeout_graceful_shutdown=10, server_header=False, proxy_headers=args.proxy_headers)
    return 0


def _build(args: argparse.Namespace, extra: list[str]) -> int:
    script = PROJECT_ROOT / ("win_setup.ps1" if sys.platform == "win32" else "build_llamacpp.sh")
    cmd = ["powershell", "-File", str(script)] if sys.platform == "win32" else ["bash", str(script)]
    return subprocess.call(cmd + extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway (first run: installs the default model)")
    data_dir_default = os.environ.get("LLM_GATEWAY_DATA_DIR", "data")
    serve.add_argument("--data-dir", default=data_dir_default)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=4000)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", default="text", choices=["text", "json"],
                       help="json: one JSON object per log line (the access log is JSON either way)")
    serve.add_argument("--access-log", action="store_true", help="uvicorn's access log too (costs throughput)")
    serve.add_argument("--proxy-headers", action="store_true",
                       help="trust X-Forwarded-For/-Proto (only behind a reverse proxy you run)")
    sub.add_parser("build", help="compile llama-server (arguments go to build_llamacpp.sh, e.g. --cuda)")
    cli_accounts.add_commands(sub, data_dir_default)
    args, extra = parser.parse_known_args(argv)
    handler = logging.StreamHandler()
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(), handlers=[handler])
    if args.command == "build":
        return _build(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "users":
        return cli_accounts.run_users(args)
    if args.command == "usage":
        return cli_accounts.run_usage(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
