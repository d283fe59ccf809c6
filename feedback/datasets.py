"""From the traffic log to candidate training examples.

One read joins ``requests`` with the caller's ``feedback`` and the ``shadow_labels``; each logged
request then yields at most one candidate per data set (SFT, DPO, KTO, regression), tagged with
the *source* of its signal. Which candidate survives is the builder's business.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from feedback.filters import Ending
from feedback.near_dup import normalize

Message = dict[str, str]
Kind = Literal["sft", "dpo", "kto", "regression"]
KINDS: tuple[Kind, ...] = ("sft", "dpo", "kto", "regression")

# Earlier sources win de-duplication and the per-caller cap: a human correction is worth more
# than a teacher answer, which is worth more than a student answer someone liked.
SOURCE_PRIORITY = {
    "correction": 0,
    "preferred": 1,
    "escalation": 2,
    "teacher": 3,
    "shadow": 4,
    "shadow_rated_down": 4,
    "positive_feedback": 5,
    "agrees_with_teacher": 5,
    "thumbs_up": 6,
    "thumbs_down": 6,
    "carried": 7,
}

_PROMPT_ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class LogRow:
    """One successful request with its feedback (from the same caller) and shadow label."""

    id: str
    created_at: float
    caller: str
    route: str | None
    adapter: str | None
    adapter_version: str | None
    messages: str | None
    params: str | None
    answer: str | None
    draft: str | None
    completion_tokens: int | None
    rating: float | None
    correction: str | None
    preferred: str | None
    shadow_answer: str | None
    shadow_finish_reason: str | None
    shadow_error: str | None

    def served_ending(self) -> Ending:
        return Ending(completion_tokens=self.completion_tokens, max_tokens=_max_tokens(self.params))

    def shadow_ending(self) -> Ending:
        return Ending(finish_reason=self.shadow_finish_reason)

    @property
    def usable_shadow(self) -> str | None:
        return self.shadow_answer if self.shadow_error is None else None

    def correction_contradicts_teacher(self) -> bool:
        """Whether the caller's correction disagrees with the teacher's own answer to this request
        (the answer it served, or its shadow answer)."""
        teacher = self.answer if self.route == "teacher" else self.usable_shadow
        if self.correction is None or teacher is None:
            return False
        return _comparable(self.correction) != _comparable(teacher)


def _comparable(text: str) -> Any:
    """Answers compared as JSON values when they are JSON, else as whitespace-normalised text."""
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        return " ".join(stripped.split())


@dataclass(frozen=True)
class Example:
    """A candidate row. ``completion`` is what the row teaches or judges: the SFT completion,
    the DPO ``chosen``, the KTO completion; ``rejected`` is DPO only, ``label`` KTO only."""

    kind: Kind
    source: str
    request_id: str
    caller: str
    created_at: float
    prompt: list[Message]
    completion: str
    ending: Ending = field(default_factory=Ending)
    rejected: str | None = None
    label: bool | None = None
    rating: float | None = None

    @property
    def teaches(self) -> bool:
        """Whether the completion is held up as good (KTO's undesirable rows are not)."""
        return self.label is not False

    @property
    def priority(self) -> tuple[int, float, str]:
        return (SOURCE_PRIORITY.get(self.source, 99), self.created_at, self.request_id)

    def conversation_root(self) -> str:
        """The first user turn: every later turn of a conversation shares it."""
        return next(m["content"] for m in self.prompt if m["role"] == "user")

    def prompt_chars(self) -> int:
        return sum(len(m["content"]) for m in self.prompt)

    def with_texts(self, prompt: list[Message], completion: str, rejected: str | None) -> Example:
        return replace(self, prompt=prompt, completion=completion, rejected=rejected)

    def render(self) -> dict[str, Any]:
        """The row in TRL's conversational prompt/completion (SFT, KTO), preference (DPO) form."""
        reply = [{"role": "assistant", "content": self.completion}]
        if self.kind == "dpo":
            return {"prompt": self.prompt, "chosen": reply,
                    "rejected": [{"role": "assistant", "content": self.rejected or ""}]}
        if self.kind == "kto":
            return {"prompt": self.prompt, "completion": reply, "label": bool(self.label)}
        return {"prompt": self.prompt, "completion": reply}


# -- reading --------------------------------------------------------------------------------

_LOG_QUERY = """
SELECT r.id, r.created_at, r.caller, r.route, r.adapter, r.adapter_version, r.messages, r.params,
       r.answer, r.draft, r.completion_tokens,
       f.rating, f.correction, f.preferred,
       s.teacher_answer, s.finish_reason, s.error
FROM requests AS r
LEFT JOIN feedback AS f ON f.request_id = r.id AND f.caller = r.caller
LEFT JOIN shadow_labels AS s ON s.request_id = r.id
WHERE r.status = 'ok'
  AND (:task IS NULL OR r.adapter = :task)
  AND (:since IS NULL OR r.created_at >= :since)
  AND (:until IS NULL OR r.created_at < :until)
ORDER BY r.created_at, r.id
"""


def read_log(conn: sqlite3.Connection, task: str | None, since: float | None, until: float | None) -> Iterator[LogRow]:
    """Successful requests of ``task`` (all tasks when None) in ``[since, until)``, oldest first."""
    cursor = conn.execute(_LOG_QUERY, {"task": task, "since": since, "until": until})
    for values in cursor:
        yield LogRow(*values)


def newest_adapter_version(conn: sqlite3.Connection, task: str | None) -> str | None:
    """The adapter version that served the task's latest student request: the 'current' one."""
    row = conn.execute(
        "SELECT adapter_version FROM requests WHERE route = 'student' AND adapter_version IS NOT NULL"
        " AND (:task IS NULL OR adapter = :task) ORDER BY created_at DESC LIMIT 1",
        {"task": task},
    ).fetchone()
    return row[0] if row else None


# -- prompts --------------------------------------------------------------------------------


def parse_prompt(messages_json: str | None) -> tuple[list[Message] | None, str | None]:
    """The logged conversation as plain role/content turns, or None and why it can't be used.

    Reasons: ``not_logged`` (log.store_messages off), ``unparseable``, ``unsupported`` (tool
    calls, images, unknown roles), ``no_user_turn``, ``not_ending_with_user``.
    """
    if messages_json is None:
        return None, "not_logged"
    try:
        raw = json.loads(messages_json)
    except (json.JSONDecodeError, TypeError):
        return None, "unparseable"
    if not isinstance(raw, list) or not raw:
        return None, "unparseable"
    prompt: list[Message] = []
    for message in raw:
        turn = _plain_turn(message)
        if turn is None:
            return None, "unsupported"
        prompt.append(turn)
    if not any(m["role"] == "user" for m in prompt):
        return None, "no_user_turn"
    if prompt[-1]["role"] != "user":
        return None, "not_ending_with_user"
    return prompt, None


def _plain_turn(message: Any) -> Message | None:
    if not isinstance(message, dict) or message.get("role") not in _PROMPT_ROLES:
        return None
    if message.get("tool_calls") or message.get("function_call"):
        return None
    content = message.get("content")
    if isinstance(content, list):
        content = _text_of_parts(content)
    if not isinstance(content, str):
        return None
    return {"role": message["role"], "content": content}


def _text_of_parts(parts: list[Any]) -> str | None:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            return None  # images, audio, files: the student is text-only
        texts.append(part["text"])
    return "\n".join(texts)


def _max_tokens(params_json: str | None) -> int | None:
    if not params_json:
        return None
    try:
        params = json.loads(params_json)
    except json.JSONDecodeError:
        return None
    if not isinstance(params, dict):
        return None
    value = params.get("max_completion_tokens", params.get("max_tokens"))
    return value if isinstance(value, int) else None


# -- candidates -----------------------------------------------------------------------------


def candidates_for(row: LogRow, prompt: list[Message], current_version: str | None) -> list[Example]:
    """Every candidate this request yields, at most one per data set."""
    makers = (_sft_candidate, _dpo_candidate, _kto_candidate)
    found = [example for make in makers if (example := make(row, prompt)) is not None]
    regression = _regression_candidate(row, prompt, current_version)
    if regression is not None:
        found.append(regression)
    return found


def _example(row: LogRow, prompt: list[Message], kind: Kind, source: str, completion: str,
             ending: Ending | None = None, rejected: str | None = None, label: bool | None = None) -> Example:
    return Example(kind=kind, source=source, request_id=row.id, caller=row.caller, created_at=row.created_at,
                   prompt=prompt, completion=completion, ending=ending or Ending(), rejected=rejected, label=label,
                   rating=row.rating)


def _candidate_text(row: LogRow, which: str) -> tuple[str | None, Ending]:
    """The logged answer named by feedback's ``preferred``."""
    if which == "answer":
        return row.answer, row.served_ending()
    if which == "draft":
        return row.draft, Ending()
    return row.usable_shadow, row.shadow_ending()


def _sft_candidate(row: LogRow, prompt: list[Message]) -> Example | None:
    if row.correction:
        return _example(row, prompt, "sft", "correction", row.correction)
    if row.preferred:
        text, ending = _candidate_text(row, row.preferred)
        return _example(row, prompt, "sft", "preferred", text or "", ending)
    if row.route == "teacher" and row.answer is not None:
        source = "escalation" if row.draft is not None else "teacher"
        return _example(row, prompt, "sft", source, row.answer, row.served_ending())
    if row.route == "student" and row.usable_shadow is not None:
        return _example(row, prompt, "sft", "shadow", row.usable_shadow, row.shadow_ending())
    if row.route == "student" and row.answer is not None and (row.rating or 0) > 0:
        return _example(row, prompt, "sft", "positive_feedback", row.answer, row.served_ending())
    return None


def _dpo_candidate(row: LogRow, prompt: list[Message]) -> Example | None:
    if row.correction and row.answer is not None:
        return _example(row, prompt, "dpo", "correction", row.correction, rejected=row.answer)
    if row.preferred:
        chosen, ending = _candidate_text(row, row.preferred)
        rejected = _runner_up(row, row.preferred)
        if chosen is None or rejected is None:
            return None
        return _example(row, prompt, "dpo", "preferred", chosen, ending, rejected=rejected)
    if row.route == "teacher" and row.draft is not None and row.answer is not None:
        return _example(row, prompt, "dpo", "escalation", row.answer, row.served_ending(), rejected=row.draft)
    if row.route == "student" and (row.rating or 0) < 0 and row.usable_shadow and row.answer is not None:
        return _example(row, prompt, "dpo", "shadow_rated_down", row.usable_shadow, row.shadow_ending(),
                        rejected=row.answer)
    return None


def _runner_up(row: LogRow, preferred: str) -> str | None:
    """The answer the preferred one beat: the served answer, or for it the draft / shadow."""
    if preferred != "answer":
        return row.answer
    return row.draft if row.draft is not None else row.usable_shadow


def _kto_candidate(row: LogRow, prompt: list[Message]) -> Example | None:
    if row.route != "student" or row.answer is None or not row.rating:
        return None
    liked = row.rating > 0
    return _example(row, prompt, "kto", "thumbs_up" if liked else "thumbs_down", row.answer,
                    row.served_ending(), label=liked)


def _regression_candidate(row: LogRow, prompt: list[Message], current_version: str | None) -> Example | None:
    """A case the current adapter gets right: liked by the caller, or the same as the teacher's
    shadow answer, and never corrected or rated down."""
    if row.route != "student" or row.answer is None or row.correction:
        return None
    if current_version is not None and row.adapter_version not in (None, current_version):
        return None
    rating = row.rating or 0
    if rating < 0:
        return None
    if rating > 0:
        return _example(row, prompt, "regression", "positive_feedback", row.answer, row.served_ending())
    if row.usable_shadow is not None and normalize(row.usable_shadow) == normalize(row.answer):
        return _example(row, prompt, "regression", "agrees_with_teacher", row.answer, row.served_ending())
    return None
