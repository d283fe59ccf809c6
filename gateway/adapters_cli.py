"""`protege adapters list|load|promote|rollback`: talk to a running gateway's admin routes.

The admin key comes from the settings (``auth.admin_key``, e.g. ``PROTEGE_AUTH__ADMIN_KEY``),
never from the command line, where ``ps`` and the shell history would show it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import httpx

from gateway.adapter_export import add_export_parser
from gateway.settings import Settings, load_settings


class AdminCallFailed(Exception):
    """The gateway refused or could not be reached; the message is for the user."""


class AdminClient:
    def __init__(self, base_url: str, admin_key: str | None, timeout_s: float = 600.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        # Promote loads and probes an adapter: minutes on a busy CPU box, hence the long time-out.
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                                    transport=transport)

    def close(self) -> None:
        self._client.close()

    def list(self) -> dict[str, Any]:
        return self._call("GET", "/admin/adapters", None)

    def load(self, task: str, path: str) -> dict[str, Any]:
        return self._call("POST", "/admin/adapters/load", {"task": task, "path": path})

    def promote(self, task: str, version: str, tenant: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/admin/adapters/promote", {"task": task, "version": version, "tenant": tenant})

    def rollback(self, task: str, tenant: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/admin/adapters/rollback", {"task": task, "tenant": tenant})

    def calibrate(self, version: str, min_confidence: float | None) -> dict[str, Any]:
        return self._call("POST", "/admin/adapters/calibrate", {"version": version, "min_confidence": min_confidence})

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise AdminCallFailed(f"cannot reach the gateway at {self._client.base_url}: {exc}") from exc
        try:
            data = response.json()
        except ValueError:
            data = {}
        if response.status_code != 200:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            message = error.get("message") if isinstance(error, dict) else None
            raise AdminCallFailed(f"{response.status_code}: {message or response.text[:300]}")
        return data


def gateway_url(settings: Settings) -> str:
    host = settings.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{settings.server.port}"


def format_list(data: dict[str, Any]) -> str:
    rows = [("VERSION", "RANK", "LOADED", "IN FLIGHT", "ALIASES")]
    for item in data.get("data", []):
        rows.append((item["name"], str(item["rank"]), "yes" if item["loaded"] else "no",
                     str(item["in_flight"]), ", ".join(item["aliases"]) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def format_change(data: dict[str, Any]) -> str:
    alias = data["task"] + (f" (tenant {data['tenant']})" if data.get("tenant") else "")
    if not data.get("changed", True):
        return f"{alias} already points at {data['version']}"
    target = data["version"] or "the task-wide alias"
    return f"{alias}: {data['previous'] or '-'} -> {target}"


def _absolute_if_local(path: str) -> str:
    # The gateway reads paths relative to its adapters folder; a path that exists here is meant
    # from the current folder (gateway and CLI share the machine in the usual set-up).
    local = Path(path)
    return str(local.resolve()) if not local.is_absolute() and local.exists() else path


def run(args: argparse.Namespace, client: AdminClient, out: TextIO) -> None:
    if args.adapters_command == "list":
        data = client.list()
        out.write((json.dumps(data, indent=2) if args.json else format_list(data)) + "\n")
    elif args.adapters_command == "load":
        data = client.load(args.task, _absolute_if_local(args.path))
        out.write(json.dumps(data, indent=2) + "\n" if args.json else
                  f"registered {data['name']} (rank {data['rank']}); promote it with "
                  f"`protege adapters promote {data['task']} {data['name']}`\n")
    elif args.adapters_command == "promote":
        data = client.promote(args.task, args.version, args.tenant)
        out.write((json.dumps(data, indent=2) if args.json else format_change(data)) + "\n")
    elif args.adapters_command == "rollback":
        data = client.rollback(args.task, args.tenant)
        out.write((json.dumps(data, indent=2) if args.json else format_change(data)) + "\n")
    elif args.adapters_command == "calibrate":
        data = client.calibrate(args.version, None if args.clear else args.min_confidence)
        out.write(json.dumps(data, indent=2) + "\n" if args.json else
                  f"{data['name']}: cascade threshold {data['min_confidence']}\n")


def cmd_adapters(args: argparse.Namespace) -> int:
    settings = load_settings(config_file=args.config)
    key = settings.auth.admin_key.get_secret_value() if settings.auth.admin_key else None
    client = AdminClient(args.url or gateway_url(settings), key)
    try:
        run(args, client, sys.stdout)
    except AdminCallFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def add_subcommand(sub: Any) -> None:
    """Add `adapters` to the `protege` parser's sub-commands (``parser.add_subparsers()``)."""
    parser = sub.add_parser("adapters", help="List, load, promote and roll back LoRA adapters "
                            "on a running gateway (admin key: auth.admin_key).")
    parser.add_argument("--url", default=None, help="Gateway URL; default: server.host/port.")
    parser.add_argument("--json", action="store_true", help="Print the gateway's JSON answer.")
    commands = parser.add_subparsers(dest="adapters_command", required=True)
    commands.add_parser("list", help="Versions, their aliases, loaded state and requests in flight.")
    load = commands.add_parser("load", help="Register an adapter folder as the task's next version.")
    load.add_argument("task")
    load.add_argument("path", help="Adapter folder inside the adapters folder.")
    promote = commands.add_parser("promote", help="Point the task's alias at a version (hot swap).")
    promote.add_argument("task")
    promote.add_argument("version", help="e.g. support@v3")
    promote.add_argument("--tenant", default=None, help="Only for this API key id.")
    rollback = commands.add_parser("rollback", help="Point the alias back at the previous version.")
    rollback.add_argument("task")
    rollback.add_argument("--tenant", default=None, help="Only for this API key id.")
    calibrate = commands.add_parser("calibrate", help="Set a version's cascade threshold (the retrain "
                                    "sets it after a promotion).")
    calibrate.add_argument("version", help="e.g. support@v3")
    threshold = calibrate.add_mutually_exclusive_group(required=True)
    threshold.add_argument("--min-confidence", type=float, help="Escalate answers less confident than this.")
    threshold.add_argument("--clear", action="store_true", help="Use router.min_confidence again.")
    add_export_parser(commands)  # offline: merges a version, needs no gateway
    parser.set_defaults(func=cmd_adapters)
