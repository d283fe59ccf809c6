"""`protege retrain`: one self-improvement cycle, end to end, and the schedule that repeats it.

1. build data from the log (stop with a reason when too little is new since the last cycle);
2. SFT a LoRA adapter (from the current adapter, or from base), then DPO on top when there are
   enough preference pairs; or, when only thumbs up/down arrived, KTO alone on the current adapter;
3. register the candidate in the running gateway under its versioned name and evaluate it
   against the current adapter, both served by vLLM, on the held-out split and the regression set;
4. promote only if it beats the current one by the margin without regressing; else keep it
   registered as rejected, with the reason;
5. record everything in ``retrain_runs``.

"Without regressing" needs care: the regression set holds requests the *current* version
answered right (users confirmed them), so the current version scores about 1.000 there by
selection, and any different candidate loses some of them, better or not. ``judge`` therefore
compares what the candidate keeps of those answers with what it keeps of the held-out rows the
current version gets right (the same kind of row, without the selection), and rejects only a
drop beyond the tolerance that is also statistically significant.

A file lock keeps two cycles from overlapping; a crashed cycle leaves a ``failed`` row and no
alias change, so re-running is safe.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from feedback.builder import Manifest, build_datasets, options_from_settings
from feedback.store import open_database
from gateway.adapters_cli import AdminCallFailed
from gateway.errors import Conflict, ProtegeError
from gateway.settings import Settings
from router.calibration import ConfidenceCalibration, calibrate_min_confidence
from trainer.config import DPORunConfig, KTORunConfig, LoraPlacement, SFTRunConfig, TrainResult
from trainer.evaluate import EvalResult, ScoredRow, evaluate
from trainer.gateway_client import GatewayClient

log = logging.getLogger("protege.retrain")

BASE_ADAPTER = "base@v0"
TrainSFT = Callable[[Path, list[dict[str, Any]], Path, SFTRunConfig, Path | None], TrainResult]
TrainDPO = Callable[[Path, list[dict[str, Any]], Path, DPORunConfig, Path], TrainResult]
TrainKTO = Callable[[Path, list[dict[str, Any]], Path, KTORunConfig, Path | None], TrainResult]


@dataclass(frozen=True)
class RetrainOptions:
    task: str
    init_from: str = "current"  # "current": continue the served adapter; "base": start fresh
    sft: SFTRunConfig = field(default_factory=SFTRunConfig)
    # Peak SFT rate when continuing a served adapter (None: sft.learning_rate).
    continue_learning_rate: float | None = None
    dpo: DPORunConfig | None = field(default_factory=DPORunConfig)
    min_new_examples: int = 32
    dpo_min_pairs: int = 64
    kto: KTORunConfig | None = field(default_factory=KTORunConfig)  # None: never KTO
    kto_min_rows: int = 32
    promote_margin: float = 0.01
    regression_tolerance: float = 0.02
    eval_max_rows: int = 200
    # Held-out rows a promoted candidate's cascade threshold is fitted on: the judged rows plus
    # this many more from the same hash order (the threshold is a tail statistic: 5% of 200 rows
    # is 10 errors, and the fitted teacher share moved 9.5% -> 16% between two similar versions).
    calibration_max_rows: int = 1000
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
    method: str | None = None  # what trained the candidate: sft | sft+dpo | kto
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: data, train, evaluate

    def summary(self) -> str:
        lines = [f"retrain {self.run_id} task={self.task}: {self.status.upper()} — {self.reason}"]
        if self.candidate:
            lines.append(f"  candidate {self.candidate} (parent {self.parent}, trained by {self.method})")
        for name in ("current_heldout", "candidate_heldout", "current_regression", "candidate_regression"):
            if name in self.metrics:
                lines.append(f"  {name:22s} {self.metrics[name]['accuracy']:.3f} on {self.metrics[name]['rows']} rows")
        phases = ", ".join(f"{name.removesuffix('_s')} {seconds:.0f}s" for name, seconds in self.timings.items())
        lines.append(f"  wall time {self.wall_s:.0f}s" + (f" ({phases})" if phases else ""))
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


def _default_kto() -> TrainKTO:
    from trainer.kto import train_kto

    return train_kto


@dataclass(frozen=True)
class NewRows:
    """Training rows that arrived since the last cycle: whether a cycle is worth it, and which."""

    sft: int
    kto_up: int
    kto_down: int


@dataclass
class Cycle:
    """One cycle's moving parts; ``run`` walks the five steps."""

    settings: Settings
    options: RetrainOptions
    gateway: GatewayClient
    train_sft: TrainSFT | None = None
    train_dpo: TrainDPO | None = None
    train_kto: TrainKTO | None = None
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
                       metrics=json.dumps({**report.metrics, "timings": report.timings}, default=str))
            runs.write(row)
            runs.close()
        return report

    def _hyperparameters(self) -> dict[str, Any]:
        return {"init_from": self.options.init_from, "sft": asdict(self.options.sft),
                "continue_learning_rate": self.options.continue_learning_rate,
                "dpo": asdict(self.options.dpo) if self.options.dpo else None,
                "kto": asdict(self.options.kto) if self.options.kto else None,
                "promote_margin": self.options.promote_margin,
                "regression_tolerance": self.options.regression_tolerance}

    # -- the five steps ---------------------------------------------------------------------
    def _steps(self, report: CycleReport, row: dict[str, Any], runs: RunLog) -> None:
        opts = self.options
        since = opts.since if opts.since is not None else runs.last_until(opts.task)
        current = self.gateway.current(opts.task)
        parent = current.name if current else BASE_ADAPTER
        report.parent = parent
        with self._timed(report, "data_s"):
            manifest, new = self._build_data(since, parent)
        row.update(data_version=manifest.version, data_hash=manifest.content_hash,
                   data_counts=json.dumps({n: f["rows"] for n, f in manifest.files.items()}),
                   data_until=self.clock(), base_fingerprint=manifest.base_model)
        method = self._method(new)
        if method is None:
            report.status, report.reason = "skipped", self._skip_reason(new)
            return
        if opts.response_format is None:
            self.options = replace(opts, response_format=runs.served_response_format(opts.task))
        if method == "kto":
            # KTO only reweights the served adapter's own answers: from a fresh LoRA it would drop
            # what that adapter learned, whatever init_from says.
            init = current.path if current else None
        else:
            init = current.path if current and opts.init_from == "current" else None
        with self._timed(report, "train_s"):
            candidate_dir, report.method = self._train(manifest, method, init)
        row.update(hyperparameters=json.dumps({**self._hyperparameters(), "method": report.method}, default=str))
        served = self.gateway.register(opts.task, str(candidate_dir.relative_to(self.settings.adapters_dir)))
        report.candidate = served.name
        with self._timed(report, "evaluate_s"):
            self._evaluate_and_decide(report, manifest, parent)

    @contextmanager
    def _timed(self, report: CycleReport, phase: str) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            report.timings[phase] = self.clock() - started

    def _build_data(self, since: float | None, parent: str) -> tuple[Manifest, NewRows]:
        s = self.settings
        probe_dir = s.data_dir / "_probe"
        fresh = build_datasets(s.db_path, probe_dir, options_from_settings(s, self.options.task, since=since,
                                                                           current_adapter_version=parent))
        thumbs = [bool(r["label"]) for r in _read_jsonl(fresh.path / "kto.train.jsonl")]
        new_rows = NewRows(sft=int(fresh.files.get("sft.train.jsonl", {}).get("rows", 0)),
                           kto_up=sum(thumbs), kto_down=len(thumbs) - sum(thumbs))
        shutil.rmtree(probe_dir, ignore_errors=True)
        # Train on everything gathered so far: continued training on only the newest failures
        # forgets what the adapter knew. `since` only decides whether a cycle is worth running.
        options = options_from_settings(s, self.options.task, current_adapter_version=parent)
        return build_datasets(s.db_path, s.data_dir, options), new_rows

    def _method(self, new: NewRows) -> str | None:
        """What this cycle trains: "sft" (then DPO when there are pairs), "kto", or None (skip)."""
        opts = self.options
        if new.sft >= opts.min_new_examples:
            return "sft"
        # Thumbs teach no new answer, but say which of the adapter's own answers to make more or
        # less likely; KTO's loss weights and KL estimate need both kinds.
        if (opts.kto is not None and new.kto_up and new.kto_down
                and new.kto_up + new.kto_down >= opts.kto_min_rows):
            return "kto"
        return None

    def _skip_reason(self, new: NewRows) -> str:
        opts = self.options
        reason = f"only {new.sft} new training rows since the last cycle (need {opts.min_new_examples})"
        if opts.kto is None:
            return reason
        return (f"{reason}; {new.kto_up} up / {new.kto_down} down new thumbs "
                f"(KTO needs {opts.kto_min_rows}, both kinds)")

    def _train(self, manifest: Manifest, method: str, init_adapter: str | None) -> tuple[Path, str]:
        """Train the candidate on everything gathered so far; its folder and what ran."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock()))
        out_dir = self.settings.adapters_dir / "_candidates" / f"{self.options.task}-{stamp}"
        init = Path(init_adapter) if init_adapter else None
        if method == "kto" and self.options.kto is not None:
            return self._train_kto(manifest, out_dir, init, self.options.kto), "kto"
        return self._train_sft_dpo(manifest, out_dir, init)

    def _train_sft_dpo(self, manifest: Manifest, out_dir: Path, init: Path | None) -> tuple[Path, str]:
        s = self.settings
        sft_rows = _read_jsonl(manifest.path / "sft.train.jsonl")
        train_sft = self.train_sft or _default_sft()
        result = train_sft(s.student_model_dir, sft_rows, out_dir / "sft", self._sft_config(init), init)
        log.info("SFT: %d examples in %.0fs (%.2f/s), loss %.3f", result.examples, result.seconds,
                 result.examples_per_s, result.final_loss)
        pairs = _read_jsonl(manifest.path / "dpo.train.jsonl")
        if self.options.dpo is not None and len(pairs) >= self.options.dpo_min_pairs:
            train_dpo = self.train_dpo or _default_dpo()
            train_dpo(s.student_model_dir, pairs, out_dir / "dpo", self.options.dpo, out_dir / "sft")
            return out_dir / "dpo", "sft+dpo"
        return out_dir / "sft", "sft"

    def _sft_config(self, init: Path | None) -> SFTRunConfig:
        continue_rate = self.options.continue_learning_rate
        if init is None or continue_rate is None:
            return self.options.sft
        return replace(self.options.sft, learning_rate=continue_rate)

    def _train_kto(self, manifest: Manifest, out_dir: Path, init: Path | None, config: KTORunConfig) -> Path:
        rows = _read_jsonl(manifest.path / "kto.train.jsonl")
        train_kto = self.train_kto or _default_kto()
        result = train_kto(self.settings.student_model_dir, rows, out_dir / "kto", config, init)
        log.info("KTO: %d examples in %.0fs (%.2f/s), loss %.3f", result.examples, result.seconds,
                 result.examples_per_s, result.final_loss)
        return out_dir / "kto"

    def _evaluate_and_decide(self, report: CycleReport, manifest: Manifest, parent: str) -> None:
        opts = self.options
        heldout_file = _read_jsonl(manifest.path / "sft.eval.jsonl")
        heldout = eval_sample(heldout_file, opts.eval_max_rows)
        regression = eval_sample(_read_jsonl(manifest.path / "regression.jsonl"), opts.eval_max_rows)
        scores: dict[str, EvalResult] = {}
        for label, rows in (("heldout", heldout), ("regression", regression)):
            for who, version in (("current", parent), ("candidate", report.candidate)):
                if rows:
                    scores[f"{who}_{label}"] = evaluate(self.gateway, f"student:{version}", rows,
                                                        max_tokens=opts.eval_max_tokens,
                                                        response_format=opts.response_format)
        report.metrics = {name: result.to_dict() for name, result in scores.items()}
        decision = judge(scores, opts.promote_margin, opts.regression_tolerance)
        if decision.regression_check is not None:
            report.metrics["regression_check"] = decision.regression_check
        report.reason = decision.reason
        if decision.promote:
            extra = calibration_extra(heldout_file, opts.eval_max_rows, opts.calibration_max_rows)
            self._calibrate(report, scores["candidate_heldout"], extra)
            self.gateway.promote(opts.task, report.candidate or "")
            report.status = "promoted"
        else:
            report.status = "rejected"

    def _calibrate(self, report: CycleReport, judged: EvalResult, extra_rows: list[dict[str, Any]]) -> None:
        """Give the candidate its own cascade threshold before it serves (a rollback then brings
        back the older version's). Fitted on the judged held-out answers plus ``extra_rows``,
        scored only now: a rejected candidate needs no threshold."""
        router = self.settings.router
        if router.calibrate_target_quality is None:
            return
        scored = judged.scored
        if extra_rows:
            extra = evaluate(self.gateway, f"student:{report.candidate}", extra_rows,
                             max_tokens=self.options.eval_max_tokens, response_format=self.options.response_format)
            scored += extra.scored
        threshold = cascade_threshold(scored, router.calibrate_target_quality, router.cascade_statistic)
        if threshold is None:
            report.metrics["calibration"] = {"skipped": f"fewer than {MIN_CALIBRATION_ROWS} rows with confidence"}
            return
        self.gateway.calibrate(report.candidate or "", threshold.min_confidence)
        report.metrics["calibration"] = {
            "min_confidence": threshold.min_confidence, "teacher_share": threshold.teacher_share,
            "quality": threshold.quality, "reached_target": threshold.reached_target,
            "target_quality": router.calibrate_target_quality, "statistic": router.cascade_statistic,
            "rows": len(scored)}


def eval_sample(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` rows, chosen by a hash of each prompt, in file order.

    The files list rows in arrival order: their first rows would be the same oldest traffic every
    cycle, and what users ask now would never be scored. A hash spreads the sample over all of
    it, and stays put between cycles: a row once chosen stays chosen until rows with smaller
    hashes arrive, so successive cycles score mostly the same rows.
    """
    return [rows[i] for i in sorted(_hash_order(rows)[:limit])]


def calibration_extra(rows: list[dict[str, Any]], judged: int, limit: int) -> list[dict[str, Any]]:
    """The rows of ``eval_sample(rows, limit)`` that ``eval_sample(rows, judged)`` left out, in
    file order: the same hash order continued, so judged + extra is a sample of up to ``limit``."""
    return [rows[i] for i in sorted(_hash_order(rows)[judged:limit])]


def _hash_order(rows: list[dict[str, Any]]) -> list[int]:
    def rank(index: int) -> str:
        return hashlib.sha256(json.dumps(rows[index].get("prompt"), sort_keys=True).encode()).hexdigest()
    return sorted(range(len(rows)), key=rank)


MIN_CALIBRATION_ROWS = 20


def cascade_threshold(scored: Sequence[ScoredRow], target_quality: float,
                      statistic: str) -> ConfidenceCalibration | None:
    """The threshold that reaches ``target_quality`` on the candidate's held-out answers (None
    when too few answers carried log-probabilities to say)."""
    pairs = [(row.min_logprob if statistic == "min" else row.mean_logprob, row.correct) for row in scored]
    pairs = [(confidence, correct) for confidence, correct in pairs if confidence is not None]
    if len(pairs) < MIN_CALIBRATION_ROWS:
        return None
    return calibrate_min_confidence([c for c, _ in pairs], [ok for _, ok in pairs], target_quality=target_quality)


MIN_BASELINE_ROWS = 10  # held-out rows the current version gets right, to trust their retention
Z_CRITICAL = 1.645  # one-sided, p < 0.05
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    # The regression check's numbers (None without a regression set), for the report's metrics.
    regression_check: dict[str, Any] | None = None


def judge(scores: dict[str, EvalResult], margin: float, tolerance: float) -> Decision:
    """Promote only a candidate that is better on held-out data and does not significantly forget
    the answers users confirmed (see ``regression_check``)."""
    if "candidate_heldout" not in scores:
        return Decision(False, "no held-out rows to evaluate on")
    check = None
    if "candidate_regression" in scores and "current_regression" in scores:
        check = regression_check(scores["current_regression"], scores["candidate_regression"],
                                 scores["current_heldout"], scores["candidate_heldout"], tolerance)
    cand, cur = scores["candidate_heldout"].accuracy, scores["current_heldout"].accuracy
    if cand < cur + margin:
        return Decision(False, f"held-out accuracy {cand:.3f} does not beat current {cur:.3f} by {margin:.3f}", check)
    reason = f"held-out accuracy {cur:.3f} -> {cand:.3f}"
    if check is None:
        return Decision(True, reason)
    if check["verdict"] == "reject":
        return Decision(False, check["note"], check)
    return Decision(True, f"{reason}; {check['note']}", check)


def retention(current: EvalResult, candidate: EvalResult) -> tuple[int, int] | None:
    """Of the rows ``current`` gets right, how many ``candidate`` also gets right, and how many
    there are (rows paired by index); None when either result lacks per-row outcomes."""
    if not current.outcomes or len(current.outcomes) != len(candidate.outcomes):
        return None
    right = [theirs for ours, theirs in zip(current.outcomes, candidate.outcomes, strict=True) if ours]
    return sum(right), len(right)


def binomial_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = (math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1) + x * log_p + (n - x) * log_q
             for x in range(k, n + 1))  # in logs: math.comb(n, x) overflows a float past n ~ 1000
    return min(1.0, sum(math.exp(t) for t in terms))


def pooled_z(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided two-proportion z statistic (pooled variance) for k1/n1 > k2/n2."""
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (k1 / n1 - k2 / n2) / se if se > 0 else 0.0


def regression_check(current_reg: EvalResult, candidate_reg: EvalResult, current_heldout: EvalResult,
                     candidate_heldout: EvalResult, tolerance: float) -> dict[str, Any]:
    """Does the candidate forget the confirmed answers more than it forgets right answers in general?

    The regression rows are answers the current version gave and users confirmed: the current
    version gets (nearly) all of them right by selection, so its accuracy there is no bar. The
    bar is the candidate's retention on held-out rows the current version gets right (rows of
    the same kind, not selected). Reject when the retention on the regression rows is lower by
    more than ``tolerance`` *and* significantly so: a one-sided pooled two-proportion z-test at
    p < 0.05; when the held-out retention is 1.0 (kept everything, or fewer than
    ``MIN_BASELINE_ROWS`` rows to measure it: no evidence, so the strict bar), a one-sided
    binomial test of the losses against a loss rate of ``tolerance``.
    """
    check: dict[str, Any] = {"tolerance": tolerance}
    reg = retention(current_reg, candidate_reg)
    if reg is None or reg[1] == 0:
        why = ("no per-row outcomes to pair the two versions' answers" if reg is None else
               f"the current version gets none of the {current_reg.rows} regression rows right now")
        check.update(verdict="skipped", note=f"regression check skipped: {why}")
        return check
    reg_kept, reg_n = reg
    base = retention(current_heldout, candidate_heldout)
    evidence = base is not None and base[1] >= MIN_BASELINE_ROWS
    base_kept, base_n = base if base is not None else (0, 0)
    baseline = base_kept / base_n if evidence else 1.0
    reg_rate = reg_kept / reg_n
    gap = baseline - reg_rate
    check.update(regression_kept=reg_kept, regression_current_right=reg_n, regression_retention=round(reg_rate, 4),
                 heldout_kept=base_kept, heldout_current_right=base_n, baseline=round(baseline, 4), gap=round(gap, 4))
    confirmed = f"kept {reg_kept}/{reg_n} of the answers users confirmed"
    if evidence:
        versus = f"vs {base_kept}/{base_n} of held-out rows the current version gets right"
    else:
        versus = (f"vs no held-out baseline (the current version gets only {base_n} held-out rows right, "
                  f"{MIN_BASELINE_ROWS} needed), so against the tolerance")
    if baseline >= 1.0:
        losses = reg_n - reg_kept
        p_value = binomial_tail(reg_n, losses, tolerance)
        significant = p_value < SIGNIFICANCE
        check.update(test="binomial", losses=losses, p=round(p_value, 6))
        stat = (f"{losses} lost, P={p_value:.2g} {'<' if significant else '>='} {SIGNIFICANCE} "
                f"at a {tolerance:.3f} loss rate")
    else:
        z = pooled_z(base_kept, base_n, reg_kept, reg_n)
        significant = z > Z_CRITICAL
        check.update(test="z", z=round(z, 3))
        stat = f"z={z:.2f} {'>' if significant else '<='} {Z_CRITICAL}"
    if gap > tolerance and significant:
        check.update(verdict="reject", note=f"regression: {confirmed} {versus} ({stat})")
    elif gap <= tolerance:
        check.update(verdict="pass",
                     note=f"{confirmed} {versus}: drop {max(gap, 0.0):.3f} <= tolerance {tolerance:.3f}")
    else:
        check.update(verdict="pass", note=f"{confirmed} {versus} ({stat}): no significant regression")
    return check


def retrain_options(settings: Settings, task: str) -> RetrainOptions:
    t = settings.trainer
    scheduler = "constant_with_warmup" if t.sft_lr_schedule == "constant" else t.sft_lr_schedule
    lora = LoraPlacement(rank=t.lora_rank, alpha=t.lora_alpha or 2.0 * t.lora_rank, dropout=t.lora_dropout,
                         top_layers=t.lora_top_layers)
    sft = SFTRunConfig(lora=lora, learning_rate=t.sft_learning_rate,
                       lr_scheduler=scheduler, epochs=t.sft_epochs, batch_size=t.sft_batch_size,
                       time_budget_s=t.sft_time_budget_s)
    return RetrainOptions(task=task, init_from=t.init_from, sft=sft, min_new_examples=t.min_new_examples,
                          dpo_min_pairs=t.dpo_min_pairs, kto_min_rows=t.kto_min_rows,
                          promote_margin=t.promote_margin,
                          regression_tolerance=t.regression_tolerance, eval_max_rows=t.eval_max_rows,
                          calibration_max_rows=t.calibration_max_rows,
                          continue_learning_rate=t.sft_continue_learning_rate)


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

