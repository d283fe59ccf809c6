"""PII and secret scrubbing for training data.

Training rows leave the gateway's log and end up baked into adapter weights, so anything that
looks like an e-mail address, a phone number, a payment card or a credential is replaced by a
typed placeholder before a row is written. The patterns prefer false positives on secrets
(a wrongly masked token costs a little data) and stay conservative on phone numbers, where
over-matching would eat dates, versions and ids.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
CARD = "[CARD]"
SECRET = "[SECRET]"

_EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

# Card-like: 13-19 digits, optionally grouped by single spaces or dashes. Luhn decides.
_CARD_RE = re.compile(r"(?<![\w])\d(?:[ -]?\d){12,18}(?![\w])")

# Phone-like: optional +country, optional (area), then 2-4 digit groups joined by separators,
# or a bare +international number. The digit count (checked in code) does the rest.
_PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,5}){1,4}(?![\w])"
    r"|(?<![\w+])\+\d{9,15}(?![\w])"
)
_PHONE_MIN_DIGITS = 9
_PHONE_MAX_DIGITS = 15

# Whole-token secrets: vendor key formats, bearer tokens, JWTs and PEM private keys.
_SECRET_RES = (
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL),
    re.compile(r"\bsk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{16,}"),
    re.compile(r"\b(?:pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)(?<=\bbearer )[A-Za-z0-9._~+/-]{16,}=*"),
)
# `api_key = "..."`, `password: ...`: keep the name (context the model may need), mask the value.
_ASSIGNED_SECRET_RE = re.compile(
    r"(?i)\b((?:api[_-]?key|access[_-]?key|secret(?:[_-]?key)?|token|password|passwd|pwd)\b"
    r"[\"']?\s*[:=]\s*)([\"']?)([^\s\"',;]{6,})\2"
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


@dataclass
class ScrubReport:
    """What one scrub replaced, by kind (email, phone, card, secret)."""

    replaced: Counter[str] = field(default_factory=Counter)

    @property
    def changed(self) -> bool:
        return bool(self.replaced)

    def add(self, other: ScrubReport) -> None:
        self.replaced.update(other.replaced)


def scrub_text(text: str) -> tuple[str, ScrubReport]:
    """``text`` with PII and secrets replaced by placeholders, and what was replaced.

    Secrets go first (a key can contain digit runs a phone pattern would half-match), cards
    before phones (a card number also looks like a long phone number).
    """
    report = ScrubReport()
    text = _replace_secrets(text, report)
    text = _sub_counted(_EMAIL_RE, text, lambda _m: EMAIL, "email", report)
    text = _sub_counted(_CARD_RE, text, _card_or_none, "card", report)
    text = _sub_counted(_PHONE_RE, text, _phone_or_none, "phone", report)
    return text, report


def _replace_secrets(text: str, report: ScrubReport) -> str:
    for pattern in _SECRET_RES:
        text = _sub_counted(pattern, text, lambda _m: SECRET, "secret", report)

    def assigned(match: re.Match[str]) -> str:
        if match.group(3) == SECRET:  # already masked by a vendor pattern above
            return match.group(0)
        report.replaced["secret"] += 1
        return f"{match.group(1)}{match.group(2)}{SECRET}{match.group(2)}"

    return _ASSIGNED_SECRET_RE.sub(assigned, text)


def _sub_counted(
    pattern: re.Pattern[str],
    text: str,
    replacement: Callable[[re.Match[str]], str | None],
    kind: str,
    report: ScrubReport,
) -> str:
    def substitute(match: re.Match[str]) -> str:
        new = replacement(match)
        if new is None:
            return match.group(0)
        report.replaced[kind] += 1
        return new

    return pattern.sub(substitute, text)


def _card_or_none(match: re.Match[str]) -> str | None:
    digits = re.sub(r"\D", "", match.group(0))
    return CARD if 13 <= len(digits) <= 19 and luhn_valid(digits) else None


def _phone_or_none(match: re.Match[str]) -> str | None:
    raw = match.group(0)
    digits = re.sub(r"\D", "", raw)
    if not _PHONE_MIN_DIGITS <= len(digits) <= _PHONE_MAX_DIGITS:
        return None
    # A dotted run like 1.2.3.4567 is a version or an address, not a phone number.
    if "." in raw and " " not in raw and "-" not in raw and not raw.startswith("+"):
        return None
    return PHONE
