"""PII and secret scrubbing: each kind is masked, look-alikes are left alone."""

from __future__ import annotations

import pytest

from feedback.pii import CARD, EMAIL, PHONE, SECRET, luhn_valid, scrub_text


@pytest.mark.parametrize(
    ("text", "kind", "secret_part"),
    [
        ("write to jane.doe+promo@mail.example.co.uk today", "email", "jane.doe+promo@mail.example.co.uk"),
        ("call me on +1 (415) 555-2671 please", "phone", "555-2671"),
        ("my number is 020 7946 0958", "phone", "7946 0958"),
        ("reach me at +447911123456", "phone", "447911123456"),
        ("card 4111 1111 1111 1111 exp 12/29", "card", "4111 1111 1111 1111"),
        ("card 5500-0000-0000-0004", "card", "5500-0000-0000-0004"),
        ("key sk-proj-abcdefghijklmnopqrstuv123 leaked", "secret", "abcdefghijklmnopqrstuv123"),
        ("aws AKIAIOSFODNN7EXAMPLE", "secret", "AKIAIOSFODNN7EXAMPLE"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", "secret", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
        ("Authorization: Bearer abc.def-ghi_jkl~mnopqrstuv", "secret", "abc.def-ghi_jkl~mnopqrstuv"),
        ('config: api_key = "s3cr3t-value-123"', "secret", "s3cr3t-value-123"),
        ("password: hunter2hunter2", "secret", "hunter2hunter2"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "secret",
         "eyJzdWIiOiIxMjM0NTY3ODkwIn0"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "secret",
         "MIIEpAIBAAKCAQEA"),
    ],
)
def test_each_kind_is_masked(text: str, kind: str, secret_part: str) -> None:
    scrubbed, report = scrub_text(text)
    assert secret_part not in scrubbed
    assert report.replaced[kind] >= 1
    placeholder = {"email": EMAIL, "phone": PHONE, "card": CARD, "secret": SECRET}[kind]
    assert placeholder in scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "released on 2024-01-15 as version 1.2.3",
        "the server at 192.168.100.200 answered",
        "order 123456 shipped",
        "4111 1111 1111 1112 is not a valid card",  # fails Luhn, and too long for a phone
        "count 1 2 3 4 5 6 7 8 9 10",
        "the password field must not be empty",
    ],
)
def test_look_alikes_are_left_alone(text: str) -> None:
    scrubbed, report = scrub_text(text)
    assert scrubbed == text
    assert not report.changed


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")


def test_report_counts_every_replacement() -> None:
    scrubbed, report = scrub_text("a@b.io and c@d.io, card 4012888888881881")
    assert scrubbed == f"{EMAIL} and {EMAIL}, card {CARD}"
    assert dict(report.replaced) == {"email": 2, "card": 1}
