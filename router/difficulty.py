"""Learned difficulty: P(the student's answer is bad | the whole conversation), and its policy.

The model is TF-IDF (binary term presence, smoothed IDF, L2-normalised) of role-tagged word
features of the whole conversation (``router.features``) followed by a logistic regression,
fitted by ``router.train`` with scikit-learn. Serving does not use scikit-learn: the fitted
vocabulary, IDF weights and coefficients are saved as one JSON artefact and scored here in plain
Python, which is faster than sklearn's per-call validation and keeps numpy and scikit-learn off
the gateway's import path. See docs/router.md for the
choice against a sentence-embedding model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.settings import RouterSettings
from router.base import register
from router.features import FeatureConfig, conversation_features
from router.types import Message, RequestFeatures, RouteDecision

ARTEFACT_FORMAT = "protege-difficulty"
ARTEFACT_FORMAT_VERSION = 1
ARTEFACT_FILE = "difficulty.json"

# feature -> (idf, coefficient)
Weights = dict[str, tuple[float, float]]


class DifficultyArtefactError(ValueError):
    """The difficulty artefact is missing, unreadable, or of an unknown format."""


@dataclass(frozen=True)
class Calibration:
    """How the threshold was chosen, and what it gave on held-out traffic."""

    threshold: float
    target_teacher_share: float | None
    target_quality: float | None
    heldout_teacher_share: float
    heldout_quality: float | None
    heldout_rows: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        def optional(name: str) -> float | None:
            return None if data.get(name) is None else float(data[name])

        return cls(
            threshold=float(data["threshold"]),
            target_teacher_share=optional("target_teacher_share"),
            target_quality=optional("target_quality"),
            heldout_teacher_share=float(data["heldout_teacher_share"]),
            heldout_quality=optional("heldout_quality"),
            heldout_rows=int(data["heldout_rows"]),
        )


@dataclass(frozen=True)
class _ServingWeights:
    """The weights laid out for the hot path: idf² and idf·coef per feature."""

    squares: dict[str, float]
    contributions: dict[str, float]

    @classmethod
    def of(cls, weights: Weights) -> _ServingWeights:
        return cls(
            squares={feature: idf * idf for feature, (idf, _) in weights.items()},
            contributions={feature: idf * coef for feature, (idf, coef) in weights.items()},
        )

    def dot(self, present: frozenset[str]) -> float:
        """<TF-IDF vector of ``present``, L2-normalised, · coefficients>, all loops in C.

        ``math.fsum`` is exact, so the score does not depend on set iteration order (which
        varies between processes with string hashing): same artefact, same input, same bits.
        """
        known = self.contributions.keys() & present
        if not known:
            return 0.0
        norm = math.sqrt(math.fsum(map(self.squares.__getitem__, known)))
        return math.fsum(map(self.contributions.__getitem__, known)) / norm


@dataclass(frozen=True)
class DifficultyModel:
    """A fitted difficulty model: pure data plus a pure-Python scorer."""

    config: FeatureConfig
    bias: float
    weights: Weights
    calibration: Calibration
    adapter: str | None  # the adapter whose answers the labels judged; None: any
    adapter_version: str | None  # its version when the model was calibrated
    trained_at: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    _serving: _ServingWeights = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_serving", _ServingWeights.of(self.weights))

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    @property
    def model_version(self) -> str:
        """Content hash of the weights: two artefacts with the same version score the same."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.config.to_json(), self.bias], sort_keys=True).encode())
        digest.update(json.dumps(sorted(self.weights.items())).encode())
        return digest.hexdigest()[:16]

    def logit(self, messages: Sequence[Message]) -> float:
        return self.bias + self._serving.dot(conversation_features(messages, self.config))

    def probability(self, messages: Sequence[Message]) -> float:
        return _sigmoid(self.logit(messages))


def tfidf_values(present: frozenset[str], idf: Mapping[str, float]) -> dict[str, float]:
    """The L2-normalised TF-IDF values of a feature set; features outside the vocabulary drop.

    What training fits on; ``_ServingWeights.dot`` computes the same dot product without
    materialising it.
    """
    known = [feature for feature in present if feature in idf]
    norm = math.sqrt(math.fsum(idf[feature] ** 2 for feature in known))
    if norm == 0.0:
        return {}
    return {feature: idf[feature] / norm for feature in known}


def _sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    exp = math.exp(logit)
    return exp / (1.0 + exp)


# -- artefact -------------------------------------------------------------------------------


def save_difficulty_model(model: DifficultyModel, out_dir: Path) -> Path:
    """Write ``difficulty.json`` under ``out_dir`` (atomically) and return its path.

    JSON, not pickle: loading an artefact must never execute code, and Python's float repr
    round-trips exactly, so a reloaded model gives bit-identical scores.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "format": ARTEFACT_FORMAT,
        "format_version": ARTEFACT_FORMAT_VERSION,
        "model_version": model.model_version,
        "trained_at": model.trained_at,
        "adapter": model.adapter,
        "adapter_version": model.adapter_version,
        "calibration": model.calibration.to_json(),
        "metrics": dict(model.metrics),
        "features": model.config.to_json(),
        "bias": model.bias,
        "weights": {feature: list(entry) for feature, entry in model.weights.items()},
    }
    path = out_dir / ARTEFACT_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(document, separators=(",", ":")))
    partial.replace(path)
    return path


def load_difficulty_model(path: Path) -> DifficultyModel:
    """Read an artefact: the JSON file itself, or the folder ``protege router train`` wrote."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / ARTEFACT_FILE
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DifficultyArtefactError(f"cannot read the difficulty artefact {path}: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != ARTEFACT_FORMAT:
        raise DifficultyArtefactError(f"{path} is not a protege difficulty artefact")
    if document.get("format_version") != ARTEFACT_FORMAT_VERSION:
        raise DifficultyArtefactError(
            f"{path}: artefact format version {document.get('format_version')!r}, this protege reads "
            f"{ARTEFACT_FORMAT_VERSION}; retrain with `protege router train`"
        )
    try:
        model = _model_from_document(document)
    except (KeyError, TypeError, ValueError) as exc:
        raise DifficultyArtefactError(f"{path}: malformed difficulty artefact ({exc})") from exc
    if document.get("model_version") not in (None, model.model_version):
        raise DifficultyArtefactError(f"{path}: weights do not match the recorded model_version")
    return model


def _model_from_document(document: dict[str, Any]) -> DifficultyModel:
    return DifficultyModel(
        config=FeatureConfig.from_json(document["features"]),
        bias=float(document["bias"]),
        weights={feature: (float(idf), float(coef)) for feature, (idf, coef) in document["weights"].items()},
        calibration=Calibration.from_json(document["calibration"]),
        adapter=document.get("adapter"),
        adapter_version=document.get("adapter_version"),
        trained_at=float(document.get("trained_at", 0.0)),
        metrics={str(k): float(v) for k, v in document.get("metrics", {}).items()},
    )


# -- policy ---------------------------------------------------------------------------------


class DifficultyPolicy:
    """Pre-call: send `auto` requests whose predicted P(bad student answer) exceeds the threshold.

    Decisive both ways for the requests it judges (it returns a student decision carrying the
    score, so the log records it), hence it belongs last among the pre-call policies.
    """

    name = "difficulty"

    def __init__(self, model: DifficultyModel, threshold: float | None = None) -> None:
        self.model = model
        self.threshold = model.threshold if threshold is None else threshold

    def decide(self, features: RequestFeatures) -> RouteDecision | None:
        if features.requested_model != "auto":
            return None
        if self.model.adapter is not None and features.adapter not in (None, self.model.adapter):
            return None  # calibrated for another adapter's answers: no opinion on this one's
        probability = self.model.probability(features.messages)
        if probability > self.threshold:
            return RouteDecision("teacher", None, "difficulty", probability)
        return RouteDecision("student", features.adapter, "student", probability)


@register("difficulty")
def difficulty_policy_from_settings(settings: RouterSettings) -> DifficultyPolicy:
    if settings.difficulty_model is None:
        raise ValueError(
            "router policy 'difficulty' needs router.difficulty_model (run `protege router train`)"
        )
    return DifficultyPolicy(load_difficulty_model(settings.difficulty_model), settings.difficulty_threshold)
