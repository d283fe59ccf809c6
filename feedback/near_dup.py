"""Text normalisation, exact keys and near-duplicate detection (MinHash + LSH, pure Python).

Used twice by the builder: to drop near-duplicate training rows, and to group near-duplicate
conversations so the held-out split never puts two versions of one prompt on both sides.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_MERSENNE = (1 << 61) - 1
_MAX_HASH = (1 << 64) - 1


def normalize(text: str) -> str:
    """Case-, width- and punctuation-insensitive form: what makes two texts 'the same'."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_WORD_RE.findall(text))


def text_key(text: str) -> str:
    """Stable hex digest of the normalised text (never Python's salted ``hash``)."""
    return hashlib.sha256(normalize(text).encode()).hexdigest()


def shingles(text: str, size: int = 3) -> frozenset[str]:
    """Word n-grams of the normalised text; short texts fall back to their words."""
    words = normalize(text).split()
    if len(words) <= size:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + size]) for i in range(len(words) - size + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def word_jaccard(a: str, b: str) -> float:
    return jaccard(frozenset(normalize(a).split()), frozenset(normalize(b).split()))


@dataclass(frozen=True)
class MinHasher:
    """MinHash signatures with ``bands * rows`` permutations, for LSH banding.

    8 bands of 4 rows find pairs with Jaccard 0.85 with probability > 0.99 while keeping the
    pure-Python cost at 32 multiply-mods per shingle; candidates are then checked exactly.
    """

    bands: int = 8
    rows: int = 4
    seed: int = 1

    def coefficients(self) -> list[tuple[int, int]]:
        coefficients = []
        for i in range(self.bands * self.rows):
            digest = hashlib.blake2b(f"{self.seed}:{i}".encode(), digest_size=16).digest()
            a = int.from_bytes(digest[:8], "big") % (_MERSENNE - 1) + 1
            b = int.from_bytes(digest[8:], "big") % _MERSENNE
            coefficients.append((a, b))
        return coefficients

    def signature(self, items: frozenset[str], coefficients: list[tuple[int, int]]) -> tuple[int, ...]:
        hashes = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") for s in items]
        if not hashes:
            return tuple([_MAX_HASH] * len(coefficients))
        return tuple(min((a * h + b) % _MERSENNE for h in hashes) for a, b in coefficients)

    def band_keys(self, signature: tuple[int, ...]) -> list[tuple[int, tuple[int, ...]]]:
        return [(band, signature[band * self.rows : (band + 1) * self.rows]) for band in range(self.bands)]


def near_duplicate_groups(texts: Sequence[str], threshold: float, hasher: MinHasher | None = None) -> list[int]:
    """For each text, the index of the first text of its near-duplicate group (itself if none).

    Groups are transitive (union-find over verified pairs), so a chain of small edits ends up
    in one group. Exact duplicates always group, whatever the threshold.
    """
    hasher = hasher or MinHasher()
    coefficients = hasher.coefficients()
    shingle_sets = [shingles(t) for t in texts]
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        root_i, root_j = find(i), find(j)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)

    buckets: dict[tuple[int, tuple[int, ...]], list[int]] = defaultdict(list)
    for index, items in enumerate(shingle_sets):
        for key in hasher.band_keys(hasher.signature(items, coefficients)):
            buckets[key].append(index)
    for members in buckets.values():
        # Compare each member with one representative per group already seen in this bucket:
        # linear in the bucket size even when hundreds of rows are copies of each other.
        representatives: list[int] = []
        for i in members:
            matched = False
            for r in representatives:
                if find(r) == find(i) or jaccard(shingle_sets[i], shingle_sets[r]) >= threshold:
                    union(i, r)
                    matched = True
            if not matched:
                representatives.append(i)
    return [find(i) for i in range(len(texts))]
