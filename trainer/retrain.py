"""`protege retrain`: one self-improvement cycle, end to end, and the schedule that repeats it.

1. build data from the log (stop with a reason when too little is new since the last cycle);
2. SFT a LoRA adapter (from the current adapter, or from base), then DPO on top when there are
   enough preference pairs;
3. register the candidate in the running gateway under its versioned name and evaluate it
   against the current adapter, both served by vLLM, on the held-out split and the regression set;
4. promote only if it beats the current one by the margin without regressing; else keep it
   registered as rejected, with the reason;
5. record everything in ``retrain_runs``.

A file lock keeps two cycles from overlapping; a crashed cycle leaves a ``failed`` row and no
alias change, so re-running is safe.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from feedback.builder import Manifest, build_datasets, options_from_settings
from feedback.store import open_database
from gateway.adapters_cli import AdminCallFailed
from gateway.errors import Conflict, ProtegeError
from gateway.settings import Settings
from trainer.config import DPORunConfig, SFTRunConfig, TrainResult
from trainer.evaluate import EvalResult, evaluate
from trainer.gateway_client import GatewayClient

log = logging.getLogger("protege.retrain")

BASE_ADAPTER = "base@v0"
TrainSFT = Callable[[Path, list[dict[str, Any]], Path, SFTRunConfig, Path | None], TrainResult]
TrainDPO = Callable[[Path, list[dict[str, Any]], Path, DPORunConfig, Path], TrainResult]


@dataclass(frozen=True)
class RetrainOptions:
    task: str
    init_from: str = "current"  # "current": continue the served adapter; "base": start fresh
    sft: SFTRunConfig = field(default_factory=SFTRunConfig)
    dpo: DPORunConfig | None = field(default_factory=DPORunConfig)
    min_new_examples: int = 32
    dpo_min_pairs: int = 64
    promote_margin: float = 0.01
    regression_tolerance: float = 0.02
    eval_max_rows: int = 200
    eval_max_tokens: int = 64
    response_format: dict[str, Any] | None = None
    since: float | None = None  # None: since the last finished cycle of this task


@dataclass
class CycleReport:
    run_id: str
    task: str
    status: str  # promoted | rejected | skipped | failed
    reason: str
    candidate: str | None = None
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def summary(self) -> str:
        lines = [f"retrain {self.run_id} task={self.task}: {self.status.upper()} — {self.reason}"]
        if self.candidate:
            lines.append(f"  candidate {self.candidate} (parent {self.parent})")
        for name in ("current_heldout", "candidate_heldout", "current_regression", "candidate_regression"):
            if name in self.metrics:
                lines.append(f"  {name:22s} {self.metrics[name]['accuracy']:.3f} on {self.metrics[name]['rows']} rows")
        lines.append(f"  wall time {self.wall_s:.0f}s")
        return "\n".join(lines)


class RetrainLocked(Conflict):
    pass


@contextmanager
def retrain_lock(home: Path) -> Iterator[None]:
    """Non-blocking exclusive lock: a second cycle refuses instead of overlapping."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "retrain.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetrainLocked("another `protege retrain` is running (lock held)", code="retrain_running") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RunLog:
    """The ``retrain_runs`` table (written by this process only, in short transactions)."""

    def __init__(self, db_path: Path) -> None:
        self.db = open_database(db_path)

    def served_response_format(self, task: str) -> dict[str, Any] | None:
        """The response format the task's callers use (most common in its recent traffic): the
        candidate is evaluated the way it will be asked."""
        counts: dict[str, int] = {}
        for (params,) in self.db.conn.execute(
                "SELECT params FROM requests WHERE adapter = ? ORDER BY created_at DESC LIMIT 200", (task,)):
            fmt = json.loads(params or "{}").get("response_format")
            if fmt is not None:
                key = json.dumps(fmt, sort_keys=True)
                counts[key] = counts.get(key, 0) + 1
        return json.loads(max(counts, key=counts.__getitem__)) if counts else None

    def last_until(self, task: str) -> float | None:
        row = self.db.conn.execute(
            "SELECT data_until FROM retrain_runs WHERE task = ? AND status IN ('promoted', 'rejected') "
            "ORDER BY started_at DESC LIMIT 1", (task,)).fetchone()
        return row[0] if row else None

    def write(self, run: dict[str, Any]) -> None:
        columns = list(run)
        sql = (f"INSERT INTO retrain_runs ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
               f"ON CONFLICT(id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in columns if c != 'id')}")
        self.db.conn.execute(sql, [run[c] for c in columns])

    def close(self) -> None:
        self.db.conn.close()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _default_sft() -> TrainSFT:
    from trainer.fast_sft import train_sft

    return train_sft


def _default_dpo() -> TrainDPO:
    from trainer.fast_sft import train_dpo

    return train_dpo


@dataclass
class Cycle:
    """One cycle's moving parts; ``run`` walks the five steps."""

    settings: Settings
    options: RetrainOptions
    gateway: GatewayClient
    train_sft: TrainSFT | None = None
    train_dpo: TrainDPO | None = None
    clock: Callable[[], float] = time.time

    def run(self) -> CycleReport:
        started = self.clock()
        run_id = f"rt-{uuid.uuid4().hex[:12]}"
        report = CycleReport(run_id, self.options.task, "failed", "started")
        runs = RunLog(self.settings.db_path)
        row: dict[str, Any] = {"id": run_id, "task": self.options.task, "started_at": started, "status": "running",
                               "hyperparameters": json.dumps(self._hyperparameters(), default=str)}
        runs.write(row)
        try:
            with retrain_lock(self.settings.home):
                self._steps(report, row, runs)
        except RetrainLocked as exc:
            report.status, report.reason = "skipped", exc.message
        except (ProtegeError, AdminCallFailed) as exc:
            report.status, report.reason = "failed", str(exc)
            log.error("retrain failed: %s", exc)
        except Exception as exc:  # noqa: BLE001 - recorded, then re-raised for the caller's exit code
            report.status, report.reason = "failed", f"{exc.__class__.__name__}: {exc}"
            raise
        finally:
            report.wall_s = self.clock() - started
            row.update(status=report.status, reason=report.reason, finished_at=self.clock(), wall_s=report.wall_s,
                       candidate=report.candidate, parent=report.parent,
                       metrics=json.dumps(report.metrics, default=str))
            runs.write(row)
            runs.close()
        return report

    def _hyperparameters(self) -> dict[str, Any]:
        return {"init_from": self.options.init_from, "sft": asdict(self.options.sft),
                "dpo": asdict(self.options.dpo) if self.options.dpo else None,
                "promote_margin": self.options.promote_margin,
                "regression_tolerance": self.options.regression_tolerance}

    # -- the five steps ---------------------------------------------------------------------
    def _steps(self, report: CycleReport, row: dict[str, Any], runs: RunLog) -> None:
        opts = self.options
        since = opts.since if opts.since is not None else runs.last_until(opts.task)
        current = self.gateway.current(opts.task)
        parent = current.name if current else BASE_ADAPTER
        report.parent = parent
        manifest, fresh = self._build_data(since, parent)
        row.update(data_version=manifest.version, data_hash=manifest.content_hash,
                   data_counts=json.dumps({n: f["rows"] for n, f in manifest.files.items()}),
                   data_until=self.clock(), base_fingerprint=manifest.base_model)
        if fresh < opts.min_new_examples:
            report.status = "skipped"
            report.reason = f"only {fresh} new training rows since the last cycle (need {opts.min_new_examples})"
            return
        if opts.response_format is None:
            self.options = replace(opts, response_format=runs.served_response_format(opts.task))
        candidate_dir = self._train(manifest, current.path if current and opts.init_from == "current" else None)
        served = self.gateway.register(opts.task, str(candidate_dir.relative_to(self.settings.adapters_dir)))
        report.candidate = served.name
        self._evaluate_and_decide(report, manifest, parent)

    def _build_data(self, since: float | None, parent: str) -> tuple[Manifest, int]:
        s = self.settings
        probe_dir = s.data_dir / "_probe"
        fresh = build_datasets(s.db_path, probe_dir, options_from_settings(s, self.options.task, since=since,
                                                                           current_adapter_version=parent))
        new_rows = int(fresh.files.get("sft.train.jsonl", {}).get("rows", 0))
        shutil.rmtree(probe_dir, ignore_errors=True)
        # Train on everything gathered so far: continued training on only the newest failures
        # forgets what the adapter knew. `since` only decides whether a cycle is worth running.
        options = options_from_settings(s, self.options.task, current_adapter_version=parent)
        return build_datasets(s.db_path, s.data_dir, options), new_rows

    def _train(self, manifest: Manifest, init_adapter: str | None) -> Path:
        s = self.settings
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock()))
        out_dir = s.adapters_dir / "_candidates" / f"{self.options.task}-{stamp}"
        sft_rows = _read_jsonl(manifest.path / "sft.train.jsonl")
        train_sft = self.train_sft or _default_sft()
        init = Path(init_adapter) if init_adapter else None
        result = train_sft(s.student_model_dir, sft_rows, out_dir / "sft", self.options.sft, init)
        log.info("SFT: %d examples in %.0fs (%.2f/s), loss %.3f", result.examples, result.seconds,
                 result.examples_per_s, result.final_loss)
        pairs = _read_jsonl(manifest.path / "dpo.train.jsonl")
        if self.options.dpo is not None and len(pairs) >= self.options.dpo_min_pairs:
            train_dpo = self.train_dpo or _default_dpo()
            train_dpo(s.student_model_dir, pairs, out_dir / "dpo", self.options.dpo, out_dir / "sft")
            return out_dir / "dpo"
        return out_dir / "sft"

    def _evaluate_and_decide(self, report: CycleReport, manifest: Manifest, parent: str) -> None:
        opts = self.options
        heldout = _read_jsonl(manifest.path / "sft.eval.jsonl")[: opts.eval_max_rows]
        regression = _read_jsonl(manifest.path / "regression.jsonl")[: opts.eval_max_rows]
        scores: dict[str, EvalResult] = {}
        for label, rows in (("heldout", heldout), ("regression", regression)):
            for who, version in (("current", parent), ("candidate", report.candidate)):
                if rows:
                    scores[f"{who}_{label}"] = evaluate(self.gateway, f"student:{version}", rows,
                                                        max_tokens=opts.eval_max_tokens,
                                                        response_format=opts.response_format)
        report.metrics = {name: result.to_dict() for name, result in scores.items()}
        verdict, reason = decide(scores, opts.promote_margin, opts.regression_tolerance)
        report.reason = reason
        if verdict:
            self.gateway.promote(opts.task, report.candidate or "")
            report.status = "promoted"
        else:
            report.status = "rejected"


def decide(scores: dict[str, EvalResult], margin: float, tolerance: float) -> tuple[bool, str]:
    """Promote only a candidate that is better on held-out data and no worse on the regression set."""
    if "candidate_heldout" not in scores:
        return False, "no held-out rows to evaluate on"
    cand, cur = scores["candidate_heldout"].accuracy, scores["current_heldout"].accuracy
    if cand < cur + margin:
        return False, f"held-out accuracy {cand:.3f} does not beat current {cur:.3f} by {margin:.3f}"
    if "candidate_regression" in scores:
        cand_r, cur_r = scores["candidate_regression"].accuracy, scores["current_regression"].accuracy
        if cand_r < cur_r - tolerance:
            return False, f"regression set accuracy fell {cur_r:.3f} -> {cand_r:.3f} (tolerance {tolerance:.3f})"
    return True, f"held-out accuracy {cur:.3f} -> {cand:.3f}"


def retrain_options(settings: Settings, task: str) -> RetrainOptions:
    t = settings.trainer
    sft = SFTRunConfig(learning_rate=t.sft_learning_rate, epochs=t.sft_epochs, batch_size=t.sft_batch_size,
                       time_budget_s=t.sft_time_budget_s)
    return RetrainOptions(task=task, init_from=t.init_from, sft=sft, min_new_examples=t.min_new_examples,
                          dpo_min_pairs=t.dpo_min_pairs, promote_margin=t.promote_margin,
                          regression_tolerance=t.regression_tolerance, eval_max_rows=t.eval_max_rows)


def parse_every(text: str) -> float:
    """'6h' / '30m' / '90s' / '1d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].replace(".", "", 1).isdigit():
        raise ValueError(f"--every wants a number and a unit (s, m, h, d), e.g. 6h; got {text!r}")
    return float(text[:-1]) * units[text[-1]]


def run_forever(make_cycle: Callable[[], Cycle], every_s: float, sleep: Callable[[float], None] = time.sleep,
                max_cycles: int | None = None) -> None:
    """The small-install scheduler: a cycle, then sleep, forever (errors are logged, not fatal)."""
    done = 0
    while max_cycles is None or done < max_cycles:
        try:
            print(make_cycle().run().summary(), flush=True)
        except Exception:  # noqa: BLE001 - a failed cycle must not stop the schedule
            log.exception("retrain cycle failed")
        done += 1
        if max_cycles is None or done < max_cycles:
            sleep(every_s)

