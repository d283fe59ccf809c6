"""The `protege` command. Each sub-command builds Settings once and hands it down; heavy
modules (torch, trl, vllm) are imported only by the sub-commands that need them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from gateway.settings import Settings, load_settings


def _offline_defaults() -> None:
    # litellm fetches a price table from the internet at import unless told not to; offline
    # machines are normal for protege's users.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _settings(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    return load_settings(config_file=args.config, overrides=overrides or {})


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    overrides: dict[str, Any] = {}
    server: dict[str, Any] = {}
    if args.host:
        server["host"] = args.host
    if args.port:
        server["port"] = args.port
    if server:
        overrides["server"] = server
    if args.student_url:
        overrides["student"] = {"url": args.student_url}
    settings = _settings(args, overrides)
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.server.host, port=settings.server.port,
                log_level=settings.server.log_level, access_log=False, loop="uvloop", http="httptools")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protege", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="YAML settings file (or PROTEGE_CONFIG).")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Run the gateway (and, unless student.url is set, vLLM).")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--student-url", default=None, help="Use an external OpenAI-compatible student server.")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
