"""`llm-gateway users ...` and `llm-gateway usage`: the account basics, straight on the database.

They work whether or not the gateway is running: a running gateway notices the change within
seconds (it watches the database) and reloads its users and keys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from .accounts import Accounts
from .errors import APIError
from .sqlite_storage import SQLiteStorage
from .storage import UsageQuery
from .usage import UsageRecorder


def add_commands(sub: argparse._SubParsersAction, data_dir_default: str) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=data_dir_default)
    users = sub.add_parser("users", help="add, list, disable or enable users")
    actions = users.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", parents=[common], help="create a user and print its API key (shown once)")
    add.add_argument("username")
    add.add_argument("--tier", default="payg", choices=["payg", "sub", "admin"])
    add.add_argument("--balance", type=float, default=0.0)
    add.add_argument("--credits", type=float, default=None)
    actions.add_parser("list", parents=[common], help="list users and their key prefixes")
    for name in ("disable", "enable"):
        act = actions.add_parser(name, parents=[common], help=f"{name} a user")
        act.add_argument("username")
    usage = sub.add_parser("usage", parents=[common], help="requests, tokens and cost per user")
    usage.add_argument("--last-hours", type=float, default=24.0)
    usage.add_argument("--by-model", action="store_true")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")


async def _with_accounts(data_dir: Path, work: Any) -> int:
    storage = SQLiteStorage(data_dir / "gateway.db")
    await storage.open()
    try:
        accounts = Accounts(storage, UsageRecorder(storage), admin_key=None)
        await accounts.load()
        return int(await work(accounts, storage))
    except APIError as e:
        print(f"llm-gateway: {e.message}")
        return 1
    finally:
        await storage.close()


def run_users(args: argparse.Namespace) -> int:
    async def work(accounts: Accounts, storage: SQLiteStorage) -> int:
        if args.action == "add":
            user, key = await accounts.create_user(args.username, args.tier, args.balance, args.credits)
            print(f"created {user.username} ({user.tier}); API key, shown only now:\n{key}")
        elif args.action == "list":
            print(f"{'username':<24} {'tier':<6} {'balance':>12} {'credits':>9} {'state':<9} keys")
            for u in sorted(accounts.users.values(), key=lambda u: u.username):
                keys = ", ".join(k.prefix + ("(off)" if k.disabled else "") for k in accounts.keys_of(u))
                credits = "-" if u.credits is None else f"{u.credits:g}"
                print(f"{u.username:<24} {u.tier:<6} {u.balance:>12.6f} {credits:>9} "
                      f"{'disabled' if u.disabled else 'active':<9} {keys}")
        else:
            user = accounts.user(args.username)
            await accounts.update_user(user, disabled=args.action == "disable")
            print(f"{user.username} is now {'disabled' if user.disabled else 'enabled'}")
        return 0
    return asyncio.run(_with_accounts(Path(args.data_dir), work))


def run_usage(args: argparse.Namespace) -> int:
    async def work(accounts: Accounts, storage: SQLiteStorage) -> int:
        rows = await storage.usage_summary(UsageQuery(start=time.time() - args.last_hours * 3600,
                                                      by_model=args.by_model))
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"usage in the last {args.last_hours:g} hours")
        print(f"{'username':<24} {'requests':>8} {'input':>10} {'output':>10} {'cached':>10} {'cost':>12}")
        for r in rows:
            print(f"{r['username']:<24} {r['requests']:>8} {r['input_tokens']:>10} {r['output_tokens']:>10} "
                  f"{r['cached_tokens']:>10} {r['cost']:>12.6f}")
            for model, m in (r.get("models") or {}).items():
                print(f"  {model or '(none)':<22} {m['requests']:>8} {m['input_tokens']:>10} "
                      f"{m['output_tokens']:>10} {m['cached_tokens']:>10} {m['cost']:>12.6f}")
        return 0
    return asyncio.run(_with_accounts(Path(args.data_dir), work))
