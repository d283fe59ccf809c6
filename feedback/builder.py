"""`protege data build`: the traffic log -> versioned, filtered, split training data sets.

Layout under the data folder (one folder per task, one immutable folder per build)::

    <data_dir>/<task>/<version>/sft.train.jsonl  sft.eval.jsonl     TRL prompt/completion
                                dpo.train.jsonl  dpo.eval.jsonl     TRL prompt/chosen/rejected
                                kto.train.jsonl  kto.eval.jsonl     TRL prompt/completion/label
                                regression.jsonl                    frozen cases the adapter gets right
                                provenance.jsonl                    file, row -> request id, caller, source
                                manifest.json
    <data_dir>/<task>/LATEST                                        name of the newest version

All rows are conversational. The held-out side is decided per conversation (its first user turn,
near-duplicates grouped), by hash, so a conversation never has turns on both sides and the same
log always splits the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedback.datasets import (
    KINDS,
    Example,
    Kind,
    Message,
    candidates_for,
    newest_adapter_version,
    parse_prompt,
    read_log,
)
from feedback.filters import (
    Judge,
    LengthRule,
    Validator,
    cap_per_caller,
    effective_cap,
    failed_validator,
    is_empty,
    is_refusal,
    is_truncated,
)
from feedback.near_dup import near_duplicate_groups, normalize, text_key, word_jaccard
from feedback.pii import ScrubReport, scrub_text
from feedback.store import open_database
from gateway.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger("protege.data")

ALL_TASKS = "_all"
LATEST = "LATEST"
MANIFEST = "manifest.json"
PROVENANCE = "provenance.jsonl"
REGRESSION_FILE = "regression.jsonl"
_TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TEACHER_SOURCES = {"teacher", "escalation"}
# Every rule's counter appears in the manifest, zero or not, so a reader sees what was checked.
RULES = ("empty", "rated_down", "no_difference", "truncated", "refusal", "length")
DEDUP_AND_LATER = ("exact_duplicate", "near_duplicate", "judge", "judge_error", "caller_cap")


@dataclass(frozen=True)
class BuildOptions:
    """What to build and how strictly. Defaults are the ones `protege data build` uses."""

    task: str | None = None
    since: float | None = None
    until: float | None = None
    holdout_share: float = 0.1
    per_caller_cap: float = 0.2
    scrub_pii: bool = True
    near_dup_threshold: float = 0.85
    # chosen and rejected sharing this share of their words are not a real preference.
    no_difference_threshold: float = 0.9
    length: LengthRule = field(default_factory=LengthRule)
    validators: tuple[Validator, ...] = ()
    judge: Judge | None = None
    min_judge_score: float = 0.5
    base_model: str | None = None
    current_adapter_version: str | None = None
    carry_regression: bool = True
    # Callers whose traffic never becomes training data (evaluation harnesses, canaries).
    exclude_callers: frozenset[str] = frozenset()
    # "drop": a caller's correction that contradicts the teacher's own answer to that request is
    # not trained on (one caller cannot overrule the teacher); "keep": corrections always win.
    corrections_against_teacher: str = "drop"
    clock: Callable[[], float] = time.time

    def describe(self) -> dict[str, Any]:
        return {
            "holdout_share": self.holdout_share,
            "per_caller_cap": self.per_caller_cap,
            "scrub_pii": self.scrub_pii,
            "near_dup_threshold": self.near_dup_threshold,
            "no_difference_threshold": self.no_difference_threshold,
            "length": asdict(self.length),
            "validators": [v.name for v in self.validators],
            "judge": self.judge is not None,
            "min_judge_score": self.min_judge_score if self.judge is not None else None,
            "carry_regression": self.carry_regression,
            "exclude_callers": sorted(self.exclude_callers),
            "corrections_against_teacher": self.corrections_against_teacher,
        }


@dataclass
class Manifest:
    """What a build produced and why: enough to reproduce it, compare it, and trust it."""

    version: str
    path: Path
    task: str | None
    created_at: str
    base_model: str | None
    adapter: dict[str, str | None]
    window: dict[str, str | None]
    options: dict[str, Any]
    requests: dict[str, int]
    sources: dict[str, dict[str, dict[str, int]]]
    filters: dict[str, dict[str, int]]
    pii: dict[str, Any]
    caller_cap: dict[str, Any]
    split: dict[str, Any]
    regression: dict[str, int]
    files: dict[str, dict[str, Any]]
    content_hash: str

    def rows(self, name: str) -> int:
        return int(self.files[name]["rows"])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def load(cls, version_dir: Path) -> Manifest:
        data = json.loads((Path(version_dir) / MANIFEST).read_text())
        data["path"] = Path(version_dir)
        return cls(**data)


@dataclass
class _Tally:
    """Counts gathered while building, per data set kind."""

    requests: Counter[str] = field(default_factory=Counter)
    candidates: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    filters: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    pii_rows: Counter[str] = field(default_factory=Counter)
    pii_replaced: Counter[str] = field(default_factory=Counter)
    callers: int = 0
    effective_cap: float = 1.0
    regression: Counter[str] = field(default_factory=Counter)
    first_row_at: float | None = None
    last_row_at: float | None = None

    def drop(self, kind: str, reason: str, count: int = 1) -> None:
        self.filters[kind][reason] += count


# -- entry points ---------------------------------------------------------------------------


def build_datasets(db_path: Path, out_dir: Path, options: BuildOptions) -> Manifest:
    """Build one new version of the task's data sets from the log at ``db_path``."""
    task_dir = Path(out_dir) / _task_folder(options.task)
    if not Path(db_path).exists():
        raise NotFound(f"no traffic log at {db_path}: nothing to build from")
    tally = _Tally()
    db = open_database(Path(db_path))
    try:
        current = options.current_adapter_version or newest_adapter_version(db.conn, options.task)
        candidates = _collect(db.conn, options, current, tally)
    finally:
        db.conn.close()
    carried = _load_carried_regression(task_dir) if options.carry_regression else []
    cleaned = {kind: _clean(kind, candidates[kind], options, tally) for kind in KINDS}
    sides = conversation_sides(
        [e for rows in cleaned.values() for e in rows] + carried,
        options.holdout_share,
        options.near_dup_threshold,
        forced_holdout={text_key(e.conversation_root()) for e in carried},
    )
    tally.callers = len({e.caller for rows in cleaned.values() for e in rows})
    tally.effective_cap = effective_cap(options.per_caller_cap, tally.callers)
    files = _assemble_files(cleaned, carried, sides, tally)
    return _write_version(task_dir, files, options, current, tally, sides)


def options_from_settings(
    settings: Settings,
    task: str | None,
    since: float | None = None,
    until: float | None = None,
    current_adapter_version: str | None = None,
    judge: Judge | None = None,
    validators: Sequence[Validator] = (),
) -> BuildOptions:
    """The build options every caller (the CLI, the retrain) derives from the settings."""
    return BuildOptions(
        task=task,
        since=since,
        until=until,
        holdout_share=settings.trainer.holdout_share,
        per_caller_cap=settings.trainer.per_caller_cap,
        exclude_callers=frozenset(settings.trainer.exclude_callers),
        corrections_against_teacher=settings.trainer.corrections_against_teacher,
        scrub_pii=settings.trainer.scrub_pii,
        near_dup_threshold=settings.trainer.near_dup_threshold,
        length=LengthRule(max_total_chars=4 * settings.student.vllm_max_model_len),
        validators=tuple(validators),
        judge=judge,
        base_model=str(settings.student_model_dir),
        current_adapter_version=current_adapter_version,
    )


def data_build_command(
    settings: Settings,
    task: str | None,
    since: str | datetime | None,
    out: Path | None,
    *,
    until: str | datetime | None = None,
    judge: Judge | None = None,
    validators: Sequence[Validator] = (),
) -> Manifest:
    """What `protege data build [--task T] [--since 7d] [--out DIR]` runs."""
    options = options_from_settings(settings, task, parse_time(since), parse_time(until),
                                    judge=judge, validators=validators)
    return build_datasets(settings.db_path, out or settings.data_dir, options)


def latest_version_dir(data_dir: Path, task: str | None) -> Path | None:
    """The newest built version of ``task``'s data sets, or None before the first build."""
    task_dir = Path(data_dir) / _task_folder(task)
    try:
        name = (task_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    version_dir = task_dir / name
    return version_dir if (version_dir / MANIFEST).exists() else None


_RELATIVE_RE = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str | datetime | float | None, now: float | None = None) -> float | None:
    """A window bound: epoch seconds, a datetime, an ISO date/time (UTC unless zoned), or a
    relative age such as ``7d``, ``12h``, ``30m`` (that long before ``now``)."""
    if value is None or isinstance(value, float | int):
        return None if value is None else float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    text = value.strip()
    relative = _RELATIVE_RE.fullmatch(text)
    if relative:
        age = int(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
        return (time.time() if now is None else now) - age
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"cannot read {value!r} as a time: use an ISO date (2025-01-31), a date-time, or an age like 7d or 12h",
            param="since",
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _task_folder(task: str | None) -> str:
    if task is None:
        return ALL_TASKS
    if not _TASK_NAME_RE.fullmatch(task):
        raise InvalidRequest(f"task {task!r}: letters, digits, '.', '_' and '-' only", param="task")
    return task


# -- collecting -----------------------------------------------------------------------------


def _collect(conn: Any, options: BuildOptions, current: str | None, tally: _Tally) -> dict[Kind, list[Example]]:
    found: dict[Kind, list[Example]] = {kind: [] for kind in KINDS}
    for row in read_log(conn, options.task, options.since, options.until):
        tally.requests["read"] += 1
        if row.caller in options.exclude_callers:
            tally.requests["skipped:excluded_caller"] += 1
            continue
        tally.first_row_at = row.created_at if tally.first_row_at is None else tally.first_row_at
        tally.last_row_at = row.created_at
        prompt, problem = parse_prompt(row.messages)
        if prompt is None:
            tally.requests[f"skipped:{problem}"] += 1
            continue
        if options.corrections_against_teacher == "drop" and row.correction_contradicts_teacher():
            # The teacher's answer stays the target; the correction is counted, not trained on.
            tally.requests["correction_overruled_by_teacher"] += 1
            row = replace(row, correction=None)
        examples = candidates_for(row, prompt, current)
        tally.requests["with_signal" if examples else "no_signal"] += 1
        for example in examples:
            tally.candidates[example.kind][example.source] += 1
            found[example.kind].append(example)
    return found


# -- cleaning -------------------------------------------------------------------------------


def _clean(kind: Kind, candidates: list[Example], options: BuildOptions, tally: _Tally) -> list[Example]:
    """Scrub, filter and de-duplicate one data set; best sources first so they win ties."""
    examples = sorted(candidates, key=lambda e: e.priority)
    if options.scrub_pii:
        examples = [_scrub(e, tally) for e in examples]
    kept = []
    for example in examples:
        reason = rule_failure(example, options)
        if reason is None:
            kept.append(example)
        else:
            tally.drop(kind, reason)
    kept = _deduplicate(kept, options.near_dup_threshold, kind, tally)
    return _judged(kept, options, kind, tally)


def _scrub(example: Example, tally: _Tally) -> Example:
    report = ScrubReport()
    prompt: list[Message] = []
    for message in example.prompt:
        content, found = scrub_text(message["content"])
        report.add(found)
        prompt.append({"role": message["role"], "content": content})
    completion, found = scrub_text(example.completion)
    report.add(found)
    rejected = None
    if example.rejected is not None:
        rejected, found = scrub_text(example.rejected)
        report.add(found)
    if not report.changed:
        return example
    tally.pii_rows[example.kind] += 1
    tally.pii_replaced.update(report.replaced)
    return example.with_texts(prompt, completion, rejected)


def rule_failure(example: Example, options: BuildOptions) -> str | None:
    """The first quality rule ``example`` breaks (its manifest counter name), or None."""
    if is_empty(example.completion) or (example.kind == "dpo" and is_empty(example.rejected)):
        return "empty"
    if example.source in _TEACHER_SOURCES and (example.rating or 0) < 0:
        return "rated_down"
    if example.kind == "dpo" and _same_answer(example.completion, example.rejected or "", options):
        return "no_difference"
    prompt_chars = example.prompt_chars()
    if not example.teaches:  # a disliked answer may be truncated or a refusal: that is the point
        return None if options.length.allows(prompt_chars, example.completion) else "length"
    if is_truncated(example.completion, example.ending):
        return "truncated"
    if is_refusal(example.completion):
        return "refusal"
    if not options.length.allows(prompt_chars, example.completion):
        return "length"
    if example.rejected is not None and prompt_chars + len(example.rejected) > options.length.max_total_chars:
        return "length"
    failed = failed_validator(options.validators, example.completion)
    return f"validator:{failed}" if failed else None


def _same_answer(chosen: str, rejected: str, options: BuildOptions) -> bool:
    if normalize(chosen) == normalize(rejected):
        return True
    return word_jaccard(chosen, rejected) >= options.no_difference_threshold


def _dedup_text(example: Example) -> str:
    turns = "\n".join(f"{m['role']}: {m['content']}" for m in example.prompt)
    parts = [turns, example.completion]
    if example.rejected is not None:
        parts.append(example.rejected)
    if example.label is not None:
        parts.insert(0, f"label:{example.label}")
    return "\n\n".join(parts)


def _deduplicate(examples: list[Example], threshold: float, kind: str, tally: _Tally) -> list[Example]:
    seen: set[str] = set()
    unique = []
    for example in examples:
        key = text_key(_dedup_text(example))
        if key in seen:
            tally.drop(kind, "exact_duplicate")
            continue
        seen.add(key)
        unique.append(example)
    groups = near_duplicate_groups([_dedup_text(e) for e in unique], threshold)
    # Each group's root is its lowest index, i.e. its best-priority member: keep that one.
    kept = [e for index, e in enumerate(unique) if groups[index] == index]
    tally.drop(kind, "near_duplicate", len(unique) - len(kept))
    return kept


def _judged(examples: list[Example], options: BuildOptions, kind: str, tally: _Tally) -> list[Example]:
    if options.judge is None:
        return examples
    kept = []
    for example in examples:
        if not example.teaches:
            kept.append(example)
            continue
        try:
            score = options.judge(example.prompt, example.completion)
        except Exception:  # the judge is the teacher behind a callable: any failure skips the row
            log.warning("judge failed on request %s", example.request_id, exc_info=True)
            tally.drop(kind, "judge_error")
            continue
        if score < options.min_judge_score:
            tally.drop(kind, "judge")
        else:
            kept.append(example)
    return kept


# -- splitting ------------------------------------------------------------------------------


def conversation_sides(
    examples: Iterable[Example], holdout_share: float, threshold: float, forced_holdout: set[str]
) -> dict[str, str]:
    """Map each conversation root (``text_key`` of its first user turn) to "train" or "eval".

    Near-duplicate roots share one side (that of their group's smallest key), so a reworded
    copy of an eval prompt cannot sit in train. Groups holding a ``forced_holdout`` root (the
    frozen regression cases) are always held out.
    """
    roots = sorted({text_key(e.conversation_root()): e.conversation_root() for e in examples}.items())
    keys = [key for key, _ in roots]
    groups = near_duplicate_groups([text for _, text in roots], threshold)
    members: dict[int, list[str]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(keys[index])
    sides: dict[str, str] = {}
    for group_keys in members.values():
        held_out = any(k in forced_holdout for k in group_keys) or _bucket(min(group_keys)) < holdout_share
        for key in group_keys:
            sides[key] = "eval" if held_out else "train"
    return sides


def _bucket(key: str) -> float:
    """A uniform number in [0, 1) fixed by the key."""
    return int(key[:15], 16) / 16**15


def _side(example: Example, sides: dict[str, str]) -> str:
    return sides[text_key(example.conversation_root())]


# -- files ----------------------------------------------------------------------------------


def _assemble_files(
    cleaned: dict[Kind, list[Example]],
    carried: list[Example],
    sides: dict[str, str],
    tally: _Tally,
) -> dict[str, list[Example]]:
    files: dict[str, list[Example]] = {}
    for kind in ("sft", "dpo", "kto"):
        for side in ("train", "eval"):
            rows = [e for e in cleaned[kind] if _side(e, sides) == side]
            files[f"{kind}.{side}.jsonl"] = _capped(rows, kind, tally, relax_to_file=side == "eval")
    files[REGRESSION_FILE] = _regression_rows(cleaned["regression"], carried, sides, tally)
    for name, rows in files.items():
        files[name] = sorted(rows, key=lambda e: (e.created_at, e.request_id))
    return files


def _capped(rows: list[Example], kind: str, tally: _Tally, relax_to_file: bool = False) -> list[Example]:
    """Each file separately: no caller above the cap in any file the trainer reads.

    ``relax_to_file``: the held-out files are small (a tenth of the build) and hold fewer callers
    than the build; there the cap relaxes to an equal share of the file's own callers, or a build
    of a few hundred rows would have no held-out rows at all (the gate could not evaluate)."""
    share = tally.effective_cap
    if relax_to_file:
        share = effective_cap(share, len({e.caller for e in rows}))
    kept = cap_per_caller(sorted(rows, key=lambda e: e.priority), lambda e: e.caller, share)
    tally.drop(kind, "caller_cap", len(rows) - len(kept))
    return kept


def _regression_rows(
    new: list[Example], carried: list[Example], sides: dict[str, str], tally: _Tally
) -> list[Example]:
    """Carried cases stay (frozen); new ones join only from the held-out side, never seen in train."""
    carried_keys = {text_key(_dedup_text(e)) for e in carried}
    held_out = []
    for example in new:
        if _side(example, sides) != "eval":
            tally.regression["train_side"] += 1
        elif text_key(_dedup_text(example)) in carried_keys:
            tally.drop("regression", "exact_duplicate")
        else:
            held_out.append(example)
    capped = _capped(held_out, "regression", tally)
    tally.regression["new"] = len(capped)
    tally.regression["carried"] = len(carried)
    return carried + capped


def _load_carried_regression(task_dir: Path) -> list[Example]:
    """The previous version's regression cases, rebuilt from its file and provenance."""
    previous = _latest_in(task_dir)
    if previous is None:
        return []
    try:
        rows = _read_jsonl(previous / REGRESSION_FILE)
        origin = [p for p in _read_jsonl(previous / PROVENANCE) if p["file"] == REGRESSION_FILE]
    except (OSError, ValueError, KeyError) as exc:
        log.warning("cannot carry the regression set of %s over (%s): starting a new one", previous, exc)
        return []
    carried = []
    for row, meta in zip(rows, origin, strict=False):
        carried.append(
            Example(kind="regression", source="carried", request_id=meta["request_id"], caller=meta["caller"],
                    created_at=float(meta["created_at"]), prompt=row["prompt"],
                    completion=row["completion"][0]["content"])
        )
    return carried


def _latest_in(task_dir: Path) -> Path | None:
    try:
        name = (task_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return task_dir / name if (task_dir / name / MANIFEST).exists() else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode("utf-8")


def _write_version(
    task_dir: Path,
    files: dict[str, list[Example]],
    options: BuildOptions,
    current: str | None,
    tally: _Tally,
    sides: dict[str, str],
) -> Manifest:
    """Write everything into a temporary folder, then rename it into place and move LATEST:
    readers see a complete version or none."""
    task_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=task_dir))
    try:
        file_info: dict[str, dict[str, Any]] = {}
        provenance: list[dict[str, Any]] = []
        for name in sorted(files):
            payload = _jsonl_bytes(e.render() for e in files[name])
            (staging / name).write_bytes(payload)
            file_info[name] = {"rows": len(files[name]), "sha256": hashlib.sha256(payload).hexdigest()}
            provenance.extend(
                {"file": name, "row": i, "request_id": e.request_id, "caller": e.caller, "source": e.source,
                 "created_at": e.created_at}
                for i, e in enumerate(files[name])
            )
        (staging / PROVENANCE).write_bytes(_jsonl_bytes(provenance))
        content_hash = hashlib.sha256(
            "".join(f"{name}\0{info['sha256']}\n" for name, info in sorted(file_info.items())).encode()
        ).hexdigest()
        built_at = options.clock()
        version_dir = _free_version_dir(task_dir, built_at, content_hash)
        manifest = _manifest(version_dir, options, current, tally, sides, files, file_info, content_hash, built_at)
        (staging / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(staging, version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _point_latest(task_dir, version_dir.name)
    log.info("built %s: %s", version_dir, {name: info["rows"] for name, info in file_info.items()})
    return manifest


def _free_version_dir(task_dir: Path, built_at: float, content_hash: str) -> Path:
    stamp = datetime.fromtimestamp(built_at, UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate = task_dir / f"{stamp}-{content_hash[:8]}"
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = task_dir / f"{stamp}-{content_hash[:8]}-{suffix}"
    return candidate


def _point_latest(task_dir: Path, version: str) -> None:
    pointer = task_dir / f".{LATEST}.tmp"
    pointer.write_text(version + "\n")
    os.replace(pointer, task_dir / LATEST)


def _filter_counts(found: Counter[str], options: BuildOptions) -> dict[str, int]:
    names = [*RULES, *(f"validator:{v.name}" for v in options.validators), *DEDUP_AND_LATER]
    counts = {name: found[name] for name in names}
    counts.update(found)
    return counts


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def _manifest(
    version_dir: Path,
    options: BuildOptions,
    current: str | None,
    tally: _Tally,
    sides: dict[str, str],
    files: dict[str, list[Example]],
    file_info: dict[str, dict[str, Any]],
    content_hash: str,
    built_at: float,
) -> Manifest:
    kept: dict[str, Counter[str]] = defaultdict(Counter)
    for name, rows in files.items():
        kind = name.split(".")[0]
        for example in rows:
            if example.source != "carried":
                kept[kind][example.source] += 1
    sources: dict[str, dict[str, dict[str, int]]] = {
        kind: {
            source: {"candidates": tally.candidates[kind][source], "kept": kept[kind][source]}
            for source in sorted(set(tally.candidates[kind]) | set(kept[kind]))
        }
        for kind in KINDS
    }
    return Manifest(
        version=version_dir.name,
        path=version_dir,
        task=options.task,
        created_at=_iso(built_at) or "",
        base_model=options.base_model,
        adapter={"alias": options.task, "version": current},
        window={
            "since": _iso(options.since),
            "until": _iso(options.until),
            "first_row_at": _iso(tally.first_row_at),
            "last_row_at": _iso(tally.last_row_at),
        },
        options=options.describe(),
        requests=dict(sorted(tally.requests.items())),
        sources=sources,
        filters={kind: _filter_counts(tally.filters[kind], options) for kind in KINDS},
        pii={"rows": {kind: tally.pii_rows[kind] for kind in KINDS},
             "replaced": dict(sorted(tally.pii_replaced.items()))},
        caller_cap={"cap": options.per_caller_cap, "callers": tally.callers,
                    "effective": tally.effective_cap},
        split={
            "holdout_share": options.holdout_share,
            "conversations": dict(sorted(Counter(sides.values()).items())),
        },
        regression=dict(sorted(tally.regression.items())),
        files=file_info,
        content_hash=content_hash,
    )

