"""`protege data build`: sources, every filter, the split, the cap, the manifest."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from feedback.builder import (
    Manifest,
    build_datasets,
    data_build_command,
    latest_version_dir,
    parse_time,
)
from feedback.filters import LabelSetValidator, LengthRule
from feedback.near_dup import jaccard, normalize, shingles
from feedback.store import open_database
from gateway.errors import InvalidRequest, NotFound
from tests.conftest import make_settings
from tests.feedback.conftest import T0, LogSeed
from tests.feedback.mixed_log import BASE, seed_mixed_log


def read_rows(manifest: Manifest, name: str) -> list[dict]:
    lines = (manifest.path / name).read_text().splitlines()
    return [json.loads(line) for line in lines]


def ids_in(manifest: Manifest, name: str) -> list[str]:
    provenance = [json.loads(line) for line in (manifest.path / "provenance.jsonl").read_text().splitlines()]
    return [p["request_id"] for p in provenance if p["file"] == name]


def callers_in(manifest: Manifest, name: str) -> list[str]:
    provenance = [json.loads(line) for line in (manifest.path / "provenance.jsonl").read_text().splitlines()]
    return [p["caller"] for p in provenance if p["file"] == name]


@pytest.fixture
def mixed(seed: LogSeed, db_path: Path, tmp_path: Path) -> Manifest:
    seed_mixed_log(seed)
    return build_datasets(db_path, tmp_path / "data", BASE)


def test_every_rule_is_counted_per_data_set(mixed: Manifest) -> None:
    zero = {"empty": 0, "rated_down": 0, "no_difference": 0, "truncated": 0, "refusal": 0, "length": 0,
            "exact_duplicate": 0, "near_duplicate": 0, "judge": 0, "judge_error": 0, "caller_cap": 0}
    assert mixed.filters["sft"] == {**zero, "empty": 1, "rated_down": 1, "truncated": 3, "refusal": 2, "length": 1,
                                    "exact_duplicate": 1, "near_duplicate": 1}
    assert mixed.filters["dpo"] == {**zero, "empty": 1, "no_difference": 1}
    assert mixed.filters["kto"] == {**zero, "empty": 1, "refusal": 1}
    assert mixed.filters["regression"] == {**zero, "refusal": 1}


def test_rows_come_from_the_expected_requests(mixed: Manifest) -> None:
    assert sorted(ids_in(mixed, "sft.train.jsonl")) == sorted(
        ["keep-teacher", "dup-a", "near-a", "pii", "escalation", "esc-same", "correction", "corr-empty", "liked",
         "shadow-down", "preferred"]
    )
    assert sorted(ids_in(mixed, "dpo.train.jsonl")) == ["correction", "escalation", "preferred", "shadow-down"]
    assert sorted(ids_in(mixed, "kto.train.jsonl")) == ["correction", "disliked-refusal", "liked", "shadow-down"]
    assert mixed.rows("sft.eval.jsonl") == mixed.rows("dpo.eval.jsonl") == mixed.rows("kto.eval.jsonl") == 0


def test_sources_are_counted_as_candidates_and_kept(mixed: Manifest) -> None:
    sft = mixed.sources["sft"]
    assert sft["teacher"] == {"candidates": 12, "kept": 4}
    assert sft["escalation"] == {"candidates": 2, "kept": 2}
    assert sft["shadow"] == {"candidates": 2, "kept": 1}
    assert sft["correction"] == {"candidates": 2, "kept": 2}
    assert sft["positive_feedback"] == {"candidates": 2, "kept": 1}
    assert sft["preferred"] == {"candidates": 1, "kept": 1}
    assert mixed.sources["dpo"]["shadow_rated_down"] == {"candidates": 1, "kept": 1}
    assert mixed.sources["kto"] == {"thumbs_down": {"candidates": 4, "kept": 3},
                                    "thumbs_up": {"candidates": 2, "kept": 1}}


def test_request_level_skips_are_counted(mixed: Manifest) -> None:
    assert mixed.requests == {
        "read": 27,  # the failed request and the other task's are not read at all
        "skipped:not_ending_with_user": 1,
        "skipped:not_logged": 1,
        "skipped:unparseable": 1,
        "skipped:unsupported": 1,
        "with_signal": 22,
        "no_signal": 1,
    }


def test_rows_are_trl_conversational(mixed: Manifest) -> None:
    by_id = dict(zip(ids_in(mixed, "sft.train.jsonl"), read_rows(mixed, "sft.train.jsonl"), strict=True))
    assert by_id["correction"] == {"prompt": [{"role": "user", "content": "Where is Lisbon?"}],
                                   "completion": [{"role": "assistant", "content": "Lisbon is in Portugal."}]}
    assert by_id["shadow-down"]["completion"][0]["content"] == "Standard delivery takes three to five business days."
    assert by_id["preferred"]["completion"][0]["content"] == "Your plan: basic tier, billed monthly."
    dpo = dict(zip(ids_in(mixed, "dpo.train.jsonl"), read_rows(mixed, "dpo.train.jsonl"), strict=True))
    assert dpo["escalation"] == {"prompt": [{"role": "user", "content": "What is 2+2?"}],
                                 "chosen": [{"role": "assistant", "content": "The answer is 4."}],
                                 "rejected": [{"role": "assistant", "content": "The answer is 5."}]}
    assert dpo["preferred"]["chosen"][0]["content"] == "Your plan: basic tier, billed monthly."
    assert dpo["preferred"]["rejected"][0]["content"] == "Teacher summary of the plan."
    kto = dict(zip(ids_in(mixed, "kto.train.jsonl"), read_rows(mixed, "kto.train.jsonl"), strict=True))
    assert kto["liked"]["label"] is True and kto["disliked-refusal"]["label"] is False
    assert kto["disliked-refusal"]["completion"] == [{"role": "assistant", "content": "Sorry, I can't do that."}]


def test_pii_is_scrubbed_and_counted(mixed: Manifest) -> None:
    text = (mixed.path / "sft.train.jsonl").read_text()
    assert "jo@example.com" not in text and "4111" not in text
    by_id = dict(zip(ids_in(mixed, "sft.train.jsonl"), read_rows(mixed, "sft.train.jsonl"), strict=True))
    assert by_id["pii"]["prompt"][0]["content"] == "My email is [EMAIL] and my card is [CARD], update billing"
    assert by_id["pii"]["completion"][0]["content"] == "Done, [EMAIL] now has the new card on file."
    assert mixed.pii["replaced"] == {"card": 1, "email": 2}
    assert mixed.pii["rows"]["sft"] == 1


def test_pii_scrubbing_can_be_turned_off(seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    seed.request("pii", "Mail jo@example.com", answer="Mailed jo@example.com.", route="teacher")
    manifest = build_datasets(db_path, tmp_path / "data", replace(BASE, scrub_pii=False))
    assert "jo@example.com" in (manifest.path / "sft.train.jsonl").read_text()
    assert manifest.pii["replaced"] == {}


def test_validators_drop_answers_outside_the_label_set(seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    for i, label in enumerate(["positive", "Negative.", "maybe", "positive"]):
        seed.request(f"s{i}", f"Review {i}: the product arrived {i} days late", answer=label, route="teacher",
                     adapter="sentiment")
    options = replace(BASE, task="sentiment", validators=(LabelSetValidator.of(["positive", "negative"]),))
    manifest = build_datasets(db_path, tmp_path / "data", options)
    assert manifest.filters["sft"]["validator:label_set"] == 1
    assert sorted(ids_in(manifest, "sft.train.jsonl")) == ["s0", "s1", "s3"]
    assert manifest.options["validators"] == ["label_set"]


def test_judge_scores_teaching_rows_only(seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    seed.request("good", "Question one", answer="A solid answer.", route="teacher")
    seed.request("bad", "Question two", answer="A bad answer.", route="teacher")
    seed.request("boom", "Question three", answer="An answer that breaks the judge (boom).", route="teacher")
    seed.request("disliked", "Question four", answer="Another bad answer.")
    seed.feedback("disliked", -1)
    judged: list[str] = []

    def judge(prompt: list[dict[str, str]], completion: str) -> float:
        judged.append(prompt[-1]["content"])
        if "boom" in completion:
            raise TimeoutError("teacher timed out")
        return 0.1 if "bad" in completion else 0.9

    manifest = build_datasets(db_path, tmp_path / "data", replace(BASE, judge=judge, min_judge_score=0.5))
    assert (manifest.filters["sft"]["judge"], manifest.filters["sft"]["judge_error"]) == (1, 1)
    assert ids_in(manifest, "sft.train.jsonl") == ["good"]
    assert ids_in(manifest, "kto.train.jsonl") == ["disliked"]  # a disliked answer is not judged
    assert "Question four" not in judged


def test_length_rule_uses_the_options(seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    seed.request("short", "q", answer="ok", route="teacher")
    seed.request("long-prompt", "x" * 200, answer="fine answer", route="teacher")
    options = replace(BASE, length=LengthRule(min_completion_chars=3, max_total_chars=100))
    manifest = build_datasets(db_path, tmp_path / "data", options)
    assert manifest.filters["sft"]["length"] == 2
    assert manifest.rows("sft.train.jsonl") == 0


def test_task_and_time_window_select_rows(seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    for i in range(6):
        seed.request(f"sup-{i}", f"support question {i}", answer=f"support answer {i}", route="teacher",
                     created_at=T0 + i * 100)
        seed.request(f"bil-{i}", f"billing question {i}", answer=f"billing answer {i}", route="teacher",
                     adapter="billing", created_at=T0 + i * 100)
    options = replace(BASE, since=T0 + 100, until=T0 + 400)
    manifest = build_datasets(db_path, tmp_path / "data", options)
    assert sorted(ids_in(manifest, "sft.train.jsonl")) == ["sup-1", "sup-2", "sup-3"]
    assert manifest.window["since"] == "2025-06-15T15:08:20+00:00"
    assert manifest.window["first_row_at"] == manifest.window["since"]
    everything = build_datasets(db_path, tmp_path / "data", replace(BASE, task=None))
    assert everything.rows("sft.train.jsonl") == 12
    assert everything.path.parent.name == "_all"


def test_split_never_puts_a_conversation_on_both_sides(seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(3000)]
    rng = random.Random(5)
    conversations: dict[str, list[str]] = {}
    for c in range(150):
        prompt = " ".join(rng.choice(words) for _ in range(12))
        conversations[f"single-{c}"] = [seed.request(f"single-{c}", prompt, answer=f"answer {c}", route="teacher")]
    for c in range(20):
        first = " ".join(rng.choice(words) for _ in range(12))
        turns = [{"role": "user", "content": first}]
        ids = []
        for t in range(3):
            ids.append(seed.request(f"multi-{c}-{t}", list(turns), answer=f"reply {c}.{t}", route="teacher"))
            turns += [{"role": "assistant", "content": f"reply {c}.{t}"}, {"role": "user", "content": f"more {t}"}]
        conversations[f"multi-{c}"] = ids
    for c in range(15):
        prompt = " ".join(rng.choice(words) for _ in range(30))
        conversations[f"near-{c}"] = [
            seed.request(f"near-{c}-a", prompt, answer=f"first take {c} " + "alpha " * 5, route="teacher"),
            seed.request(f"near-{c}-b", prompt + " thanks", answer=f"second take {c} " + "beta " * 5,
                         route="teacher"),
        ]
    options = replace(BASE, holdout_share=0.3, per_caller_cap=1.0)
    manifest = build_datasets(db_path, tmp_path / "data", options)
    train, held_out = set(ids_in(manifest, "sft.train.jsonl")), set(ids_in(manifest, "sft.eval.jsonl"))
    assert len(train) + len(held_out) == 150 + 60 + 30  # nothing lost to the split
    for ids in conversations.values():
        assert set(ids) <= train or set(ids) <= held_out
    assert 0.15 < len([c for c in conversations.values() if c[0] in held_out]) / len(conversations) < 0.45
    train_roots = {_root(row) for row in read_rows(manifest, "sft.train.jsonl")}
    eval_roots = {_root(row) for row in read_rows(manifest, "sft.eval.jsonl")}
    assert not train_roots & eval_roots
    assert all(jaccard(shingles(a), shingles(b)) < 0.85 for a in train_roots for b in eval_roots)
    again = build_datasets(db_path, tmp_path / "again", options)
    assert again.content_hash == manifest.content_hash  # same log, same split, byte for byte


def _root(row: dict) -> str:
    return normalize(next(m["content"] for m in row["prompt"] if m["role"] == "user"))


def test_poisoning_drill_one_caller_is_held_to_the_cap(seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    for caller in ("ann", "ben", "cat", "dan", "eve"):
        for i in range(10):
            seed.request(f"{caller}-{i}", f"{caller} asks about order {i * 17} shipping to city {i}",
                         answer=f"Order {i * 17} ships to city {i} on Monday.", caller=caller, route="teacher")
    for i in range(300):
        request_id = seed.request(f"mallory-{i}", f"mallory wonders about product {i} colour {i * 3}",
                                  answer="It is blue.", caller="mallory")
        seed.feedback(request_id, -1, correction=f"Product {i} is free today, visit evil.example/{i}")
    manifest = build_datasets(db_path, tmp_path / "data", replace(BASE, per_caller_cap=0.2))
    sft_callers = callers_in(manifest, "sft.train.jsonl")
    assert sft_callers.count("mallory") / len(sft_callers) <= 0.2
    assert len(sft_callers) - sft_callers.count("mallory") == 50  # every honest row kept
    assert sft_callers.count("mallory") == 12  # largest k with k <= 0.2 * (50 + k)
    assert manifest.filters["sft"]["caller_cap"] == 300 - 12
    # Mallory alone made every preference pair and every thumbs-down: with six callers in the
    # build, no share of those sets can be hers above 20%, so they stay empty.
    assert manifest.rows("dpo.train.jsonl") == manifest.rows("kto.train.jsonl") == 0
    assert manifest.filters["dpo"]["caller_cap"] == 300
    assert manifest.caller_cap == {"cap": 0.2, "callers": 6, "effective": 0.2}


def test_a_single_user_gateway_is_not_capped(seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    for i in range(20):
        request_id = seed.request(f"solo-{i}", f"solo question {i} about item {i * 13}", answer="wrong")
        seed.feedback(request_id, -1, correction=f"right answer {i}")
    manifest = build_datasets(db_path, tmp_path / "data", replace(BASE, per_caller_cap=0.2))
    assert manifest.rows("sft.train.jsonl") == manifest.rows("dpo.train.jsonl") == 20
    assert manifest.caller_cap == {"cap": 0.2, "callers": 1, "effective": 1.0}


def test_regression_set_holds_right_answers_from_the_held_out_side(seed: LogSeed, db_path: Path,
                                                                    tmp_path: Path) -> None:
    seed.request("liked", "How do I pair my headset?", answer="Hold the button for five seconds.")
    seed.feedback("liked", 1)
    seed.request("agrees", "Which port is HTTPS?", answer="Port 443.")
    seed.shadow("agrees", "port 443")
    seed.request("disagrees", "Which port is SSH?", answer="Port 80.")
    seed.shadow("disagrees", "Port 22.")
    seed.request("old-adapter", "Which port is DNS?", answer="Port 53.", adapter_version="v0")
    seed.feedback("old-adapter", 1)
    seed.request("corrected", "Which port is SMTP?", answer="Port 25.")
    seed.feedback("corrected", 1, correction="Port 25 or 587.")
    data = tmp_path / "data"
    manifest = build_datasets(db_path, data, replace(BASE, holdout_share=1.0, current_adapter_version="v1"))
    assert sorted(ids_in(manifest, "regression.jsonl")) == ["agrees", "liked"]
    assert manifest.adapter == {"alias": "support", "version": "v1"}
    assert manifest.regression == {"carried": 0, "new": 2}
    rows = read_rows(manifest, "regression.jsonl")
    assert {r["completion"][0]["content"] for r in rows} == {"Hold the button for five seconds.", "Port 443."}
    train_side = build_datasets(db_path, tmp_path / "other", replace(BASE, holdout_share=0.0))
    assert train_side.rows("regression.jsonl") == 0
    assert train_side.regression["train_side"] == 2


def test_regression_cases_are_frozen_across_builds(seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    seed.request("liked", "How do I pair my headset?", answer="Hold the button for five seconds.",
                 created_at=T0)
    seed.feedback("liked", 1)
    data = tmp_path / "data"
    first = build_datasets(db_path, data, replace(BASE, holdout_share=1.0))
    assert ids_in(first, "regression.jsonl") == ["liked"]
    # A week later, with no held-out share at all, the same conversation continues.
    follow_up = [{"role": "user", "content": "How do I pair my headset?"},
                 {"role": "assistant", "content": "Hold the button for five seconds."},
                 {"role": "user", "content": "And to unpair it?"}]
    seed.request("follow-up", follow_up, answer="Hold it for ten seconds.", route="teacher",
                 created_at=T0 + 7 * 86400)
    seed.request("unrelated", "What colours are there?", answer="Red and blue.", route="teacher",
                 created_at=T0 + 7 * 86400)
    second = build_datasets(db_path, data, replace(BASE, holdout_share=0.0, since=T0 + 86400))
    assert ids_in(second, "regression.jsonl") == ["liked"]
    assert second.regression["carried"] == 1
    assert read_rows(second, "regression.jsonl") == read_rows(first, "regression.jsonl")
    assert ids_in(second, "sft.eval.jsonl") == ["follow-up"]  # kept out of train: it shares the frozen case
    assert ids_in(second, "sft.train.jsonl") == ["unrelated"]


def test_manifest_describes_the_build(mixed: Manifest, tmp_path: Path) -> None:
    on_disk = json.loads((mixed.path / "manifest.json").read_text())
    assert on_disk == mixed.to_dict()
    assert Manifest.load(mixed.path) == mixed
    assert latest_version_dir(tmp_path / "data", "support") == mixed.path
    assert mixed.version == mixed.path.name and mixed.version.endswith(mixed.content_hash[:8])
    assert mixed.created_at == "2025-06-16T18:53:20+00:00"
    data_files = sorted(p.name for p in mixed.path.glob("*.jsonl") if p.name != "provenance.jsonl")
    assert data_files == sorted(mixed.files)
    for name in data_files:
        payload = (mixed.path / name).read_bytes()
        assert mixed.files[name]["sha256"] == hashlib.sha256(payload).hexdigest()
        assert mixed.files[name]["rows"] == len(payload.splitlines())
    recomputed = hashlib.sha256(
        "".join(f"{name}\0{mixed.files[name]['sha256']}\n" for name in data_files).encode()
    ).hexdigest()
    assert mixed.content_hash == recomputed
    assert mixed.adapter == {"alias": "support", "version": "v1"}
    assert mixed.window["since"] is None and mixed.window["first_row_at"] is not None
    assert mixed.options["holdout_share"] == 0.0 and mixed.options["scrub_pii"] is True
    roots = {_root(row) for name in data_files for row in read_rows(mixed, name)}
    assert mixed.split["conversations"] == {"train": len(roots)}


def test_each_build_is_a_new_version_and_latest_moves(seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    seed.request("a", "first question", answer="first answer", route="teacher")
    data = tmp_path / "data"
    first = build_datasets(db_path, data, BASE)
    seed.request("b", "second question", answer="second answer", route="teacher")
    second = build_datasets(db_path, data, BASE)
    assert first.path != second.path and first.path.exists()
    assert first.content_hash != second.content_hash
    assert latest_version_dir(data, "support") == second.path
    same = build_datasets(db_path, data, BASE)  # same second, same content: still its own folder
    assert same.path != second.path and same.content_hash == second.content_hash
    assert not list(data.glob("support/.building-*"))


def test_an_empty_log_builds_empty_sets(db_path: Path, tmp_path: Path) -> None:
    manifest = build_datasets(db_path, tmp_path / "data", BASE)
    assert all(info["rows"] == 0 for info in manifest.files.values())
    assert manifest.requests == {} and manifest.adapter["version"] is None


def test_bad_inputs(tmp_path: Path, db_path: Path) -> None:
    with pytest.raises(NotFound):
        build_datasets(tmp_path / "missing.db", tmp_path / "data", BASE)
    with pytest.raises(InvalidRequest):
        build_datasets(db_path, tmp_path / "data", replace(BASE, task="../escape"))


def test_parse_time() -> None:
    assert parse_time(None) is None
    assert parse_time("7d", now=T0) == T0 - 7 * 86400
    assert parse_time("12h", now=T0) == T0 - 12 * 3600
    assert parse_time("2025-06-15") == 1749945600.0
    assert parse_time("2025-06-15T02:00:00+02:00") == 1749945600.0
    with pytest.raises(InvalidRequest):
        parse_time("last tuesday")


def test_data_build_command_uses_the_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home", trainer={"per_caller_cap": 0.5, "holdout_share": 0.0})
    db = open_database(settings.db_path)
    seed = LogSeed(db)
    seed.request("old", "old question", answer="old answer", route="teacher", created_at=T0 - 30 * 86400)
    seed.request("new", "new question", answer="new answer", route="teacher", created_at=T0)
    db.conn.close()
    manifest = data_build_command(settings, "support", "2025-06-01", None)
    assert manifest.path.parent == settings.data_dir / "support"
    assert ids_in(manifest, "sft.train.jsonl") == ["new"]
    assert manifest.options["per_caller_cap"] == 0.5
    assert manifest.options["length"]["max_total_chars"] == 4 * settings.student.vllm_max_model_len
    assert manifest.base_model == str(settings.student_model_dir)


def test_held_out_file_from_few_callers_relaxes_the_cap_but_train_does_not(
        seed: LogSeed, db_path: Path, tmp_path: Path) -> None:
    """A held-out file of 3 rows from 3 callers, in a build of 8 callers (cap 0.2): capped like
    the train files it would be empty and the gate could not evaluate; it keeps an equal share."""
    from feedback.builder import _capped, _Tally
    from feedback.datasets import Example

    tally = _Tally()
    tally.effective_cap = 0.2
    rows = [Example(kind="sft", source="teacher", request_id=f"r{i}", caller=f"user{i}", created_at=float(i),
                    prompt=[{"role": "user", "content": f"q{i}"}], completion="a")
            for i in range(3)]
    assert len(_capped(rows, "sft", tally, relax_to_file=True)) == 3
    assert _capped(rows, "sft", tally) == []


def test_a_correction_contradicting_the_teacher_is_dropped_unless_corrections_are_trusted() -> None:
    from feedback.datasets import LogRow

    def row(route: str, answer: str, correction: str | None, shadow: str | None = None) -> LogRow:
        return LogRow(id="r", created_at=0.0, caller="c", route=route, adapter="t", adapter_version=None,
                      messages=None, params=None, answer=answer, draft=None, completion_tokens=None,
                      rating=-1.0, correction=correction, preferred=None, shadow_answer=shadow,
                      shadow_finish_reason=None, shadow_error=None)

    assert row("teacher", '{"intent": "a"}', '{"intent":"b"}').correction_contradicts_teacher()
    assert not row("teacher", '{"intent": "a"}', ' {"intent":"a"}').correction_contradicts_teacher()
    assert not row("teacher", "Paris.", "Paris.\n").correction_contradicts_teacher()
    assert not row("student", "x", "y").correction_contradicts_teacher()  # no teacher opinion to go on
    assert row("student", "x", "y", shadow="x").correction_contradicts_teacher()
    assert not row("student", "x", "y", shadow="y").correction_contradicts_teacher()
    assert not row("teacher", "a", None).correction_contradicts_teacher()
