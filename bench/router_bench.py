"""Router benchmark: decision latency per policy, and routing quality against a random router.

    python bench/router_bench.py                      # simulation from BANKING77 (see below)
    python bench/router_bench.py --db ~/.protege/protege.db [--adapter NAME]
    python bench/router_bench.py --minilm-dir DIR     # also the sentence-embedding baseline

Routing quality is measured on held-out traffic (never seen by training or calibration) as
- CPT(95%): the teacher-call share needed to reach 95% of the all-teacher accuracy;
- APGR: the area under "performance gap recovered" against teacher share (random: 0.5 on average);
for the learned difficulty policy (pre-call), the confidence cascade (post-call: it pays for a
student call on every request), and a random router with seeded scores, all in the same run.

Default input: a simulation from BANKING77 ($PROTEGE_BANKING77 or ../shared/data/banking77). It
is a proxy, not the real student. The "student" is a TF-IDF + logistic-regression intent
classifier fitted on 8 examples per intent that reads every user turn of the conversation (so
an earlier turn can distract it, as context distracts a 135M model); its confidence is its
top-class log-probability. The "teacher" is the same classifier fitted on the whole training
set and reads the last turn. Conversations are a system prompt, in 30% of cases an earlier
exchange, and the query. The log is written to a temporary SQLite file through
``feedback.store.open_database`` (25% shadow samples, 10% thumbs up/down judged against the true
intent) and read back by ``router.train``. Quality on the test split is judged against the true
intents. With --db, the newest 30% of the log is the test set, the teacher is the reference
(a labelled "bad" row is a student miss) and quality is measured on its labelled rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from feedback.store import open_database  # noqa: E402
from gateway.settings import RouterSettings  # noqa: E402
from router.base import Router  # noqa: E402
from router.calibration import (  # noqa: E402
    RoutingCurve,
    average_pgr,
    calibrate_min_confidence,
    call_performance_threshold,
    routing_curve,
    teacher_share,
)
from router.cascade import CascadePolicy  # noqa: E402
from router.difficulty import DifficultyPolicy, load_difficulty_model  # noqa: E402
from router.policies import ExplicitPolicy, RulesPolicy  # noqa: E402
from router.train import FitOptions, LoggedRequest, read_logged_requests, split_by_time, train_from_traffic  # noqa: E402
from router.types import Message, RequestFeatures, StudentOutcome  # noqa: E402

SYSTEM_PROMPT = "You are a bank's support assistant. Answer with the intent label of the customer's message."
TARGET_SHARE = 0.30
TEST_FRACTION = 0.3  # --db: the newest share of the log kept for testing


@dataclass(frozen=True)
class EvalRequest:
    """A held-out request with what each model would have answered, and whether that was right."""

    messages: tuple[Message, ...]
    student_answer: str
    student_correct: bool
    teacher_correct: bool
    confidence: float | None


@dataclass(frozen=True)
class Dataset:
    traffic: list[LoggedRequest]  # what training sees (the log)
    test: list[EvalRequest]
    description: str


# -- BANKING77 simulation ---------------------------------------------------------------------


def banking77_dir() -> Path | None:
    configured = os.environ.get("PROTEGE_BANKING77")
    path = Path(configured) if configured else ROOT.parent / "shared" / "data" / "banking77"
    return path if (path / "train.csv").exists() and (path / "test.csv").exists() else None


def read_banking77(path: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    def read(name: str) -> list[tuple[str, str]]:
        with open(path / name, newline="") as handle:
            return [(row["text"], row["category"]) for row in csv.DictReader(handle)]

    return read("train.csv"), read("test.csv")


def intent_classifier(texts: Sequence[str], labels: Sequence[str]) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(C=10.0, max_iter=3000)
    )
    return pipeline.fit(list(texts), list(labels))


@dataclass(frozen=True)
class SimulatedRequest:
    messages: tuple[Message, ...]
    student_answer: str
    confidence: float
    teacher_answer: str
    truth: str


def simulate_requests(
    rows: Sequence[tuple[str, str]],
    pool: Sequence[tuple[str, str]],
    student: Any,
    teacher: Any,
    rng: np.random.Generator,
) -> list[SimulatedRequest]:
    """Wrap each query in a conversation; the student reads all user turns, the teacher the last."""
    conversations: list[tuple[Message, ...]] = []
    student_inputs = []
    for text, _ in rows:
        history: tuple[Message, ...] = (Message("system", SYSTEM_PROMPT),)
        earlier_user_turns = ""
        if rng.random() < 0.3:
            earlier_text, earlier_label = pool[int(rng.integers(len(pool)))]
            history += (Message("user", earlier_text), Message("assistant", earlier_label))
            earlier_user_turns = earlier_text + " "
        conversations.append(history + (Message("user", text),))
        student_inputs.append(earlier_user_turns + text)
    probabilities = student.predict_proba(student_inputs)
    teacher_answers = teacher.predict([text for text, _ in rows])
    return [
        SimulatedRequest(
            messages=messages,
            student_answer=str(student.classes_[int(np.argmax(p))]),
            confidence=float(np.log(np.max(p))),
            teacher_answer=str(teacher_answer),
            truth=truth,
        )
        for messages, p, teacher_answer, (_, truth) in zip(conversations, probabilities, teacher_answers, rows)
    ]


def write_simulated_log(db_path: Path, requests: Sequence[SimulatedRequest], rng: np.random.Generator) -> None:
    """Student-served `auto` traffic with shadow samples and thumbs, as the gateway logs it."""
    db = open_database(db_path)
    rows, shadow, feedback = [], [], []
    for index, request in enumerate(requests):
        request_id, created_at = f"req-{index:06d}", 1_700_000_000.0 + index
        rows.append(
            {
                "id": request_id,
                "created_at": created_at,
                "caller": "bench",
                "requested_model": "auto",
                "route": "student",
                "reason": "student",
                "adapter": "banking77",
                "adapter_version": "v1",
                "messages": json.dumps([{"role": m.role, "content": m.content} for m in request.messages]),
                "answer": request.student_answer,
                "confidence": request.confidence,
                "status": "ok",
            }
        )
        draw = rng.random()
        if draw < 0.25:
            shadow.append(
                {"request_id": request_id, "teacher_answer": request.teacher_answer, "created_at": created_at}
            )
        elif draw < 0.35:
            rating = 1.0 if request.student_answer == request.truth else -1.0
            feedback.append(
                {"request_id": request_id, "caller": "bench", "rating": rating, "created_at": created_at,
                 "updated_at": created_at}
            )
    db["requests"].insert_all(rows)
    db["shadow_labels"].insert_all(shadow)
    db["feedback"].insert_all(feedback)
    db.conn.close()


def simulated_dataset(seed: int, scratch: Path) -> Dataset:
    data_dir = banking77_dir()
    if data_dir is None:
        sys.exit("BANKING77 not found: set PROTEGE_BANKING77 or pass --db")
    rng = np.random.default_rng(seed)
    train, test = read_banking77(data_dir)
    seen: dict[str, int] = {}
    student_rows, traffic_rows = [], []
    for index in rng.permutation(len(train)):
        text, label = train[int(index)]
        seen[label] = seen.get(label, 0) + 1
        (student_rows if seen[label] <= 8 else traffic_rows).append((text, label))
    student = intent_classifier([text for text, _ in student_rows], [label for _, label in student_rows])
    teacher = intent_classifier([text for text, _ in train], [label for _, label in train])
    logged = simulate_requests(traffic_rows, train, student, teacher, rng)
    db_path = scratch / "simulated.db"
    write_simulated_log(db_path, logged, rng)
    test_requests = [
        EvalRequest(
            r.messages, r.student_answer, r.student_answer == r.truth, r.teacher_answer == r.truth, r.confidence
        )
        for r in simulate_requests(test, train, student, teacher, rng)
    ]
    description = (
        f"BANKING77 simulation (seed {seed}): {len(student_rows)} student training rows, {len(logged)} logged "
        f"requests, {len(test_requests)} test requests; student accuracy "
        f"{np.mean([r.student_correct for r in test_requests]):.3f}, teacher accuracy "
        f"{np.mean([r.teacher_correct for r in test_requests]):.3f}"
    )
    return Dataset(read_logged_requests(db_path, "banking77"), test_requests, description)


# -- a real log -------------------------------------------------------------------------------


def logged_dataset(db_path: Path, adapter: str | None) -> Dataset:
    traffic = read_logged_requests(db_path, adapter)
    older, newest = split_by_time(traffic, TEST_FRACTION)
    test = [EvalRequest(row.messages, "", not row.bad, True, row.confidence) for row in newest if row.bad is not None]
    description = f"{db_path}: {len(older)} requests for training, {len(test)} labelled test requests (newest)"
    return Dataset(older, test, description)


# -- measurements -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Per-call percentiles in µs: wall clock, and this thread's CPU time (immune to preemption
    by other processes, which dominates wall-clock p99 on a shared machine)."""

    wall_p50: float
    wall_p99: float
    cpu_p50: float
    cpu_p99: float


def time_calls(call: Callable[[int], object], count: int, repeats: int = 3) -> Latency:
    for index in range(count):  # warm-up pass
        call(index)
    wall, cpu = [], []
    for _ in range(repeats):
        for index in range(count):
            wall_start, cpu_start = time.perf_counter_ns(), time.thread_time_ns()
            call(index)
            cpu.append(time.thread_time_ns() - cpu_start)
            wall.append(time.perf_counter_ns() - wall_start)
    wall_us, cpu_us = np.asarray(wall) / 1000.0, np.asarray(cpu) / 1000.0
    return Latency(*np.percentile(wall_us, [50, 99]).tolist(), *np.percentile(cpu_us, [50, 99]).tolist())


def latency_table(difficulty: DifficultyPolicy, test: Sequence[EvalRequest], min_confidence: float | None) -> list[str]:
    settings = RouterSettings(min_confidence=min_confidence)
    features = [
        RequestFeatures("auto", None, r.messages, sum(len(m.content) // 4 + 4 for m in r.messages)) for r in test
    ]
    outcomes = [StudentOutcome(mean_logprob=r.confidence, output_text=r.student_answer) for r in test]
    long_features = [RequestFeatures("auto", None, messages, 2000) for messages in long_conversations(test, 300)]
    explicit, rules, cascade = ExplicitPolicy(settings), RulesPolicy(settings), CascadePolicy(settings)
    router = Router([explicit, rules, difficulty], [cascade], "base")
    timings = {
        "explicit": time_calls(lambda i: explicit.decide(features[i]), len(features)),
        "rules": time_calls(lambda i: rules.decide(features[i]), len(features)),
        "difficulty": time_calls(lambda i: difficulty.decide(features[i]), len(features)),
        "difficulty, worst case: 16 long turns (~8k characters)": time_calls(
            lambda i: difficulty.decide(long_features[i]), len(long_features)
        ),
        "cascade (post-call review)": time_calls(lambda i: cascade.review(features[i], outcomes[i]), len(features)),
        "Router.route: explicit, rules, difficulty": time_calls(lambda i: router.route(features[i]), len(features)),
    }
    lines = ["| policy | wall p50 (µs) | wall p99 (µs) | CPU p50 (µs) | CPU p99 (µs) |", "|---|---|---|---|---|"]
    lines += [
        f"| {name} | {t.wall_p50:.1f} | {t.wall_p99:.1f} | {t.cpu_p50:.1f} | {t.cpu_p99:.1f} |"
        for name, t in timings.items()
    ]
    return lines


def long_conversations(test: Sequence[EvalRequest], count: int) -> list[tuple[Message, ...]]:
    """Conversations at the context limit: the feature caps, not the caller, bound their cost."""
    texts = [r.messages[-1].content for r in test]

    def paragraph(start: int, length: int) -> str:
        return " ".join(texts[(start + k) % len(texts)] for k in range(length))

    return [
        tuple(Message("user" if turn % 2 == 0 else "assistant", paragraph(start + turn, 8)) for turn in range(15))
        + (Message("user", paragraph(start, 30)),)
        for start in range(count)
    ]


def quality_line(name: str, curve: RoutingCurve, share_at_threshold: float | None) -> str:
    share = "–" if share_at_threshold is None else f"{100 * share_at_threshold:.1f}%"
    return (
        f"| {name} | {100 * call_performance_threshold(curve, 0.95):.1f}% | {average_pgr(curve):.3f} | "
        f"{100 * curve.student_quality:.1f}% / {100 * curve.teacher_quality:.1f}% | {share} |"
    )


def quality_table(
    difficulty: DifficultyPolicy, test: Sequence[EvalRequest], min_confidence: float | None, seed: int
) -> list[str]:
    student = [float(r.student_correct) for r in test]
    teacher = [float(r.teacher_correct) for r in test]
    difficulty_risk = [difficulty.model.probability(r.messages) for r in test]
    lines = [
        "| router | CPT(95%) | APGR | accuracy all-student / all-teacher | teacher share at the calibrated threshold |",
        "|---|---|---|---|---|",
        quality_line("difficulty (pre-call)", routing_curve(difficulty_risk, student, teacher),
                     teacher_share(difficulty_risk, difficulty.threshold)),
    ]
    if all(r.confidence is not None for r in test):
        cascade_risk = [-float(r.confidence) for r in test]  # type: ignore[arg-type]
        lines.append(quality_line(
            "cascade on mean logprob (post-call)", routing_curve(cascade_risk, student, teacher),
            None if min_confidence is None else teacher_share(cascade_risk, -min_confidence),
        ))
    random_risk = np.random.default_rng(seed).random(len(test))
    lines.append(quality_line("random", routing_curve(random_risk, student, teacher), None))
    return lines


def calibrate_cascade(heldout: Sequence[LoggedRequest]) -> float | None:
    """The cascade threshold for the target share, on the same held-out split as the difficulty's."""
    pairs = [(r.confidence, not r.bad) for r in heldout if r.bad is not None and r.confidence is not None]
    if len(pairs) < 20:
        return None
    calibration = calibrate_min_confidence(
        [c for c, _ in pairs], [ok for _, ok in pairs], target_teacher_share=TARGET_SHARE
    )
    return calibration.min_confidence


# -- the embedding baseline (torch: only here, only with --minilm-dir) -------------------------


def conversation_text(messages: Sequence[Message]) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


def minilm_baseline(
    model_dir: Path, traffic: Sequence[LoggedRequest], test: Sequence[EvalRequest]
) -> tuple[str, str]:
    """all-MiniLM-L6-v2 mean-pooled embeddings of the role-marked conversation + logistic regression.

    Returns (quality table line, latency and AUC note).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encoder = AutoModel.from_pretrained(str(model_dir)).eval()

    def embed(texts: Sequence[str]) -> np.ndarray:
        with torch.inference_mode():
            batch = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    def embed_all(texts: Sequence[str]) -> np.ndarray:
        return np.vstack([embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])

    fit_rows = [r for r in split_by_time(traffic, FitOptions().heldout_fraction)[0] if r.bad is not None]
    started = time.perf_counter()
    x_fit = embed_all([conversation_text(r.messages) for r in fit_rows])
    x_test = embed_all([conversation_text(r.messages) for r in test])
    embed_seconds = time.perf_counter() - started
    classifier = LogisticRegression(C=1.0, max_iter=5000).fit(x_fit, [int(bool(r.bad)) for r in fit_rows])
    risk = classifier.predict_proba(x_test)[:, 1]
    student = [float(r.student_correct) for r in test]
    teacher = [float(r.teacher_correct) for r in test]
    curve = routing_curve(risk, student, teacher)
    sample = [conversation_text(r.messages) for r in test[:300]]
    latency = time_calls(lambda i: classifier.predict_proba(embed([sample[i]])), len(sample), repeats=1)
    test_auc = roc_auc_score([1 - s for s in student], risk)
    note = (
        f"MiniLM baseline: test AUC {test_auc:.3f}; one decision wall p50 {latency.wall_p50:.0f} µs, "
        f"p99 {latency.wall_p99:.0f} µs "
        f"({len(fit_rows) + len(test)} embeddings in {embed_seconds:.0f}s, torch threads {torch.get_num_threads()})"
    )
    return quality_line("MiniLM-L6 embedding + LR (pre-call)", curve, None), note


# -- main -------------------------------------------------------------------------------------


def run(dataset: Dataset, adapter: str | None, scratch: Path, seed: int, minilm_dir: Path | None) -> None:
    started = time.perf_counter()
    report = train_from_traffic(dataset.traffic, scratch / "router", TARGET_SHARE, None, adapter)
    training_seconds = time.perf_counter() - started
    policy = DifficultyPolicy(load_difficulty_model(report.artefact_path))
    calibration_rows = split_by_time(dataset.traffic, FitOptions().heldout_fraction)[1]
    min_confidence = calibrate_cascade(calibration_rows)
    test_risk = [policy.model.probability(r.messages) for r in dataset.test]
    print(dataset.description)
    print(
        f"\ntraining: {training_seconds:.1f}s, {report.labelled_rows} labelled of {report.traffic_rows} logged "
        f"({report.label_sources}), C={report.regularisation_c}, held-out AUC {report.heldout_auc:.3f}; "
        f"calibrated for a {TARGET_SHARE:.0%} teacher share: {100 * report.heldout_teacher_share:.1f}% on the "
        f"calibration split, {100 * teacher_share(test_risk, policy.threshold):.1f}% on the test set"
    )
    load = os.getloadavg()
    print(f"\nDecision latency, one call at a time ({os.cpu_count()} CPUs, load average {load[0]:.1f})\n")
    print("\n".join(latency_table(policy, dataset.test, min_confidence)))
    print(f"\nRouting quality on {len(dataset.test)} test requests\n")
    lines = quality_table(policy, dataset.test, min_confidence, seed)
    note = None
    if minilm_dir is not None:
        minilm_line, note = minilm_baseline(minilm_dir, dataset.traffic, dataset.test)
        lines.insert(len(lines) - 1, minilm_line)
    print("\n".join(lines))
    print(f"\ntest AUC of the difficulty model: {auc(dataset.test, test_risk):.3f}")
    if note is not None:
        print(note)


def auc(test: Sequence[EvalRequest], risk: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([0 if r.student_correct else 1 for r in test], risk))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, help="a protege SQLite log (default: the BANKING77 simulation)")
    parser.add_argument("--adapter", help="with --db: only this adapter's traffic")
    parser.add_argument("--minilm-dir", type=Path, help="an all-MiniLM-L6-v2 folder: add the embedding baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        if args.db is None:
            dataset, adapter = simulated_dataset(args.seed, Path(scratch)), "banking77"
        else:
            dataset, adapter = logged_dataset(args.db, args.adapter), args.adapter
        run(dataset, adapter, Path(scratch), args.seed, args.minilm_dir)


if __name__ == "__main__":
    main()
