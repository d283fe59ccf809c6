"""protege's one configuration object.

Built once (``load_settings``) at process start and passed down; nothing else in the code base reads
``os.environ``. Sources, highest priority first: constructor arguments, ``PROTEGE_*`` environment
variables (nested with ``__``, e.g. ``PROTEGE_TEACHER__MODEL``), the YAML file named by
``PROTEGE_CONFIG`` / ``--config``, then the defaults below. Unknown keys are rejected everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_HOME = Path("~/.protege").expanduser()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Requests with a larger body are refused with 413."
    )
    max_concurrency: int = Field(
        256,
        ge=1,
        description="Chat requests in flight at once; beyond this the gateway answers 429 at once "
        "instead of queueing without bound.",
    )
    max_n: int = Field(4, ge=1, description="Largest accepted `n` (choices per request).")
    max_tokens_limit: int = Field(
        4096, ge=1, description="Largest accepted `max_tokens` / `max_completion_tokens`."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the gateway process."
    )


class AuthSettings(_Section):
    api_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Caller keys: key id -> secret. Empty means the gateway is open (local use); "
        "the key id, never the key, is what the log and metrics record.",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="Key for admin operations (adapter load/promote/rollback). Unset: admin "
        "endpoints are disabled.",
    )


class StudentSettings(_Section):
    url: str | None = Field(
        None,
        description="Base URL of an external OpenAI-compatible student server (e.g. "
        "http://vllm:8001/v1). Unset: `protege serve` starts and supervises vLLM itself.",
    )
    api_key: SecretStr | None = Field(None, description="Key sent to the student server, if any.")
    adapter_registry: bool | None = Field(
        None,
        description="Manage LoRA adapters on the student server (versioned names, aliases, hot-swap, "
        "base@v0); needs runtime LoRA loading and the adapters folder visible to vLLM at the same "
        "path. False: a plain OpenAI-compatible student, the alias is sent as the model name. "
        "Unset: on for the managed vLLM, off for an external `url`.",
    )
    model_dir: Path | None = Field(
        None,
        description="Student base model folder (HF format). Unset: the folder `protege model "
        "prepare` builds under `home`.",
    )
    served_model_name: str = Field("student-base", description="Name vLLM serves the base under.")
    timeout_s: float = Field(
        30.0, gt=0, description="Time-out of one student call; past it `auto` falls back."
    )
    default_adapter: str = Field(
        "default",
        description="Task (adapter alias) used when the request names none (`student`, `auto`); "
        "until its first promotion it is served by base@v0. `protege retrain --task default` improves it.",
    )
    vllm_port: int = Field(8001, ge=1, le=65535, description="Port of the managed vLLM server.")
    vllm_max_loras: int = Field(4, ge=1, description="Adapters vLLM keeps loaded at once.")
    vllm_max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank vLLM accepts.")
    vllm_max_model_len: int = Field(2048, ge=64, description="Context length the student serves.")
    vllm_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Student dtype; on CPU fp32 is much faster than bf16."
    )
    vllm_extra_args: list[str] = Field(
        default_factory=list, description="Extra command-line arguments for the vLLM server."
    )
    vllm_start_timeout_s: float = Field(
        600.0, gt=0, description="How long to wait for a managed vLLM to become ready."
    )
    vllm_python: Path | None = Field(
        None,
        description="Python interpreter that runs the managed vLLM (a venv with vllm installed). "
        "Unset: the gateway's own interpreter.",
    )
    vllm_host: str = Field(
        "127.0.0.1", description="Address the managed vLLM listens on; keep it on loopback."
    )
    vllm_cpu_kvcache_gib: int = Field(
        2, ge=1, description="vLLM-CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    vllm_cpu_threads: str | None = Field(
        None,
        description="CPU ids vLLM-CPU binds its threads to (VLLM_CPU_OMP_THREADS_BIND, e.g. "
        "`0-3`). Unset: every CPU the gateway may run on.",
    )
    vllm_log_file: Path | None = Field(
        None, description="File the managed vLLM's output goes to. Unset: `logs/vllm.log` under `home`."
    )
    vllm_restart_backoff_s: float = Field(
        1.0, gt=0, description="First wait before restarting a crashed vLLM; doubles per crash."
    )
    vllm_restart_backoff_max_s: float = Field(
        60.0, gt=0, description="Longest wait between vLLM restarts."
    )
    vllm_stop_timeout_s: float = Field(
        15.0, gt=0, description="Grace period after SIGTERM before vLLM is killed."
    )
    adapter_load_timeout_s: float = Field(
        120.0, gt=0, description="Time-out of one adapter load (or probe) call to vLLM."
    )
    adapter_drain_timeout_s: float = Field(
        300.0,
        ge=0,
        description="After a promote or rollback, how long requests still running on the old "
        "version may take before it is unloaded anyway.",
    )
    base_adapter_rank: int = Field(
        8, ge=1, description="Rank of the identity adapter `base@v0` the base model is served as."
    )


class TeacherSettings(_Section):
    model: str | None = Field(
        None,
        description="litellm model string (openai/gpt-4o-mini, anthropic/claude-..., "
        "hosted_vllm/..., ollama/...). Unset: no teacher; `auto` serves the student only.",
    )
    api_base: str | None = Field(
        None, description="Teacher API base URL. Settings-only: requests can never change it."
    )
    api_key: SecretStr | None = Field(None, description="Teacher API key.")
    timeout_s: float = Field(60.0, gt=0, description="Time-out of one teacher call.")
    max_retries: int = Field(
        2, ge=0, description="Retries on 408/429/500/502/503 and connection errors, with back-off."
    )
    retry_backoff_s: float = Field(0.25, ge=0, description="First back-off; doubles each retry.")
    cooldown_failure_ratio: float = Field(
        0.5, gt=0, le=1, description="Failure share in the window that puts the teacher on cool-down."
    )
    cooldown_window: int = Field(20, ge=1, description="Calls in the failure window.")
    cooldown_s: float = Field(30.0, ge=0, description="How long a cooled-down teacher is skipped.")
    input_cost_per_token: float | None = Field(
        None, ge=0, description="Override of litellm's price table (USD per input token)."
    )
    output_cost_per_token: float | None = Field(
        None, ge=0, description="Override of litellm's price table (USD per output token)."
    )


class LogSettings(_Section):
    db_path: Path | None = Field(
        None, description="SQLite file of the traffic log. Unset: `protege.db` under `home`."
    )
    batch_size: int = Field(256, ge=1, description="Rows the writer inserts per transaction.")
    queue_max: int = Field(
        100_000,
        ge=1,
        description="Rows buffered in memory while SQLite is slow or locked; beyond it rows are "
        "dropped and counted.",
    )
    flush_interval_s: float = Field(0.05, gt=0, description="Writer wake-up interval.")
    retry_interval_s: float = Field(0.5, gt=0, description="Back-off after a failed write.")
    synchronous: Literal["OFF", "NORMAL", "FULL"] = Field(
        "NORMAL",
        description="SQLite `synchronous` in WAL mode. NORMAL: a power loss may lose the last "
        "committed batches, never corrupts; FULL: nothing committed is lost.",
    )
    store_messages: bool = Field(True, description="Keep request messages and answers in the log.")


class RouterSettings(_Section):
    policies: list[str] = Field(
        default_factory=lambda: ["explicit", "rules", "fallback", "cascade"],
        description="Router policies in order (pre-call: explicit, rules, uncalibrated, difficulty — put difficulty last; post-call: fallback, cascade); the first that decides wins. `uncalibrated` sends `auto` straight to the teacher while the served student version has no calibrated threshold.",
    )
    student_context_tokens: int = Field(
        2048, ge=64, description="Conversations longer than this (estimated) go to the teacher."
    )
    teacher_patterns: list[str] = Field(
        default_factory=list, description="Regexes on the last user message that force the teacher."
    )
    teacher_tenants: list[str] = Field(
        default_factory=list, description="Caller key ids always served by the teacher."
    )
    difficulty_model: Path | None = Field(
        None, description="Artefact of `protege router train` (learned difficulty policy)."
    )
    difficulty_threshold: float | None = Field(
        None, description="Override of the artefact's calibrated threshold."
    )
    request_logprobs: bool = Field(
        True,
        description="Ask the student for token log-probabilities on every call (logged as "
        "`confidence`, used by the cascade and its calibration); stripped unless the caller asked.",
    )
    min_confidence: float | None = Field(
        None,
        description="Confidence cascade: escalate when the student's mean token log-probability "
        "is below this. Unset: cascade off.",
    )
    cascade_statistic: Literal["mean", "min"] = Field(
        "mean",
        description="Confidence cascade: compare the mean or the minimum token log-probability of "
        "the student's answer with `min_confidence` (calibrate the threshold on the same one).",
    )
    output_regex: str | None = Field(
        None,
        description="Confidence cascade: a student answer (stripped) that does not fully match this "
        "regex goes to the teacher as `invalid_output`. Unset: no regex check.",
    )
    calibrate_target_quality: float | None = Field(
        0.95,
        gt=0,
        le=1,
        description="When a retrain promotes an adapter, it sets that version's cascade threshold "
        "from its held-out evaluation: the lowest teacher share at which the system's accuracy "
        "(escalated answers counted right) reaches this. A rollback restores the older version's "
        "own threshold. Unset: every version uses `min_confidence`.",
    )


class ShadowSettings(_Section):
    sample_rate: float = Field(
        0.0, ge=0, le=1, description="Share of student-served requests also sent to the teacher."
    )
    queue_max: int = Field(1000, ge=1, description="Shadow calls waiting; beyond it they are skipped.")
    concurrency: int = Field(2, ge=1, description="Shadow calls in flight at once.")


class TrainerSettings(_Section):
    adapters_dir: Path | None = Field(
        None, description="Where adapters live. Unset: `adapters/` under `home`."
    )
    data_dir: Path | None = Field(
        None, description="Where built data sets live. Unset: `datasets/` under `home`."
    )
    min_new_examples: int = Field(32, ge=1, description="A retrain with fewer new rows stops.")
    init_from: Literal["current", "base"] = Field(
        "current", description="Retrain continues the served adapter (`current`) or starts from the base."
    )
    sft_learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate of the LoRA SFT.")
    sft_continue_learning_rate: float | None = Field(
        None,
        gt=0,
        description="Peak SFT learning rate when a retrain continues the served adapter "
        "(`init_from: current`); unset: `sft_learning_rate`. The fresh-adapter rate warms a "
        "converged adapter back up and can undo it in a short run.",
    )
    sft_lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="After warm-up the SFT learning rate decays to zero (`cosine`, `linear`) at the "
        "last step or at the end of `sft_time_budget_s`, whichever comes first; `constant` keeps "
        "the peak until the run stops.",
    )
    sft_epochs: float = Field(2.0, gt=0, description="Passes over the SFT rows per retrain.")
    lora_top_layers: int | None = Field(
        10,
        ge=1,
        description="A new adapter gets LoRA on the top N decoder layers only (unset: every layer). "
        "Fewer layers train faster per example; more can reach higher accuracy given the time "
        "(docs/trainer.md). A retrain that continues an adapter keeps that adapter's layers.",
    )
    lora_rank: int = Field(
        16,
        ge=1,
        description="LoRA rank of a new adapter; at most `student.vllm_max_lora_rank`, or vLLM "
        "refuses the adapter. A retrain that continues an adapter keeps that adapter's rank.",
    )
    lora_alpha: float | None = Field(
        None,
        gt=0,
        description="LoRA alpha of a new adapter; the update is scaled by alpha/rank. Unset: twice "
        "the rank.",
    )
    lora_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input of a new adapter while it trains; 0 skips the op "
        "(faster on CPU).",
    )
    sft_batch_size: int = Field(16, ge=1, description="SFT examples per optimiser step.")
    sft_time_budget_s: float | None = Field(
        None, gt=0, description="Stop SFT after this many seconds of training (None: no limit)."
    )
    dpo_min_pairs: int = Field(
        64, ge=1, description="DPO runs on top of the SFT adapter only with at least this many pairs."
    )
    kto_min_rows: int = Field(
        32,
        ge=2,
        description="With too few new SFT rows for a retrain, KTO alone continues the served "
        "adapter on thumbs up/down when at least this many new KTO rows, with both kinds, arrived.",
    )
    eval_max_rows: int = Field(
        300,
        ge=1,
        description="Held-out and regression rows scored per adapter in a retrain (a larger file "
        "is sampled by a hash of each prompt, over all its traffic).",
    )
    calibration_max_rows: int = Field(
        1000,
        ge=1,
        description="Held-out rows a promoted candidate's cascade threshold is fitted on: the "
        "judged ones plus more in the same hash order, scored only once it is promoted (the "
        "threshold sets the teacher share from the tail of a few errors).",
    )
    promote_margin: float = Field(
        0.01, ge=0, description="A candidate must beat the current adapter by this much."
    )
    regression_tolerance: float = Field(
        0.02, ge=0, description="Largest accepted drop on the frozen regression set."
    )
    per_caller_cap: float = Field(
        0.2, gt=0, le=1, description="Largest share of a data set from one caller."
    )
    scrub_pii: bool = Field(True, description="Scrub e-mails, phones, card numbers and keys.")
    exclude_callers: list[str] = Field(
        default_factory=list,
        description="Caller key ids whose traffic never becomes training data (evaluation "
        "harnesses, canaries).",
    )
    corrections_against_teacher: Literal["drop", "keep"] = Field(
        "drop",
        description="A caller's correction that contradicts the teacher's own answer to the same "
        "request (served, or shadow-sampled) is not trained on (`drop`: one caller cannot "
        "overrule the teacher; counted in the data set's manifest) or wins (`keep`).",
    )
    holdout_share: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of conversations held out for evaluation (by hash of the first user "
        "turn, so a conversation is never on both sides).",
    )
    near_dup_threshold: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Word-shingle Jaccard similarity at which two training rows (or two "
        "conversations, for the split) count as near-duplicates.",
    )


class Settings(BaseSettings):
    """Everything protege can be told. See README § Configuration for the table."""

    model_config = SettingsConfigDict(
        env_prefix="PROTEGE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    home: Path = Field(DEFAULT_HOME, description="State folder: database, model cache, adapters.")
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    student: StudentSettings = Field(default_factory=StudentSettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)

    @model_validator(mode="after")
    def _lora_rank_fits_the_student(self) -> Settings:
        # Checked when settings load, not when the adapter is: a retrain would otherwise spend its
        # whole budget on an adapter the student server then refuses.
        if self.trainer.lora_rank > self.student.vllm_max_lora_rank:
            raise ValueError(
                f"trainer.lora_rank {self.trainer.lora_rank} is above student.vllm_max_lora_rank "
                f"{self.student.vllm_max_lora_rank}: vLLM would refuse the trained adapter"
            )
        return self

    @model_validator(mode="after")
    def _expand_home(self) -> Settings:
        # Absolute from here on: child processes (vLLM, the trainer) may run in other folders.
        self.home = self.home.expanduser().absolute()
        return self

    # Derived paths: one place decides where state lives.
    @property
    def manages_adapters(self) -> bool:
        if self.student.adapter_registry is not None:
            return self.student.adapter_registry
        return self.student.url is None

    @property
    def db_path(self) -> Path:
        return _absolute(self.log.db_path or self.home / "protege.db")

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"

    @property
    def student_model_dir(self) -> Path:
        return _absolute(self.student.model_dir or self.model_cache_dir / "smollm2-135m-instruct")

    @property
    def adapters_dir(self) -> Path:
        return _absolute(self.trainer.adapters_dir or self.home / "adapters")

    @property
    def data_dir(self) -> Path:
        return _absolute(self.trainer.data_dir or self.home / "datasets")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)


def _absolute(path: Path) -> Path:
    return path.expanduser().absolute()


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the settings file must hold a mapping at the top level")
    return data


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the one Settings object: YAML file < environment < explicit overrides.

    ``environ`` defaults to the process environment; this is the only place that reads it.
    """
    env = dict(os.environ if environ is None else environ)
    config_path = config_file or (Path(env["PROTEGE_CONFIG"]) if env.get("PROTEGE_CONFIG") else None)
    file_values = _read_yaml(config_path) if config_path else {}
    env_values = _env_values(env)
    values = _deep_merge(_deep_merge(file_values, env_values), overrides or {})
    return Settings.model_validate(values)


def _env_values(env: dict[str, str]) -> dict[str, Any]:
    """PROTEGE_A__B=v -> {"a": {"b": v}}; list/dict values may be given as JSON."""
    import json

    values: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith("PROTEGE_") or name == "PROTEGE_CONFIG":
            continue
        path = name[len("PROTEGE_") :].lower().split("__")
        value: Any = raw
        if raw[:1] in "[{":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return values


def settings_reference() -> str:
    """The configuration table for the README (kept in sync by a test)."""
    lines = ["| setting | env | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub_name, sub_field in annotation.model_fields.items():
                lines.append(_reference_row(f"{name}.{sub_name}", sub_field))
        else:
            lines.append(_reference_row(name, field))
    return "\n".join(lines)


def _reference_row(dotted: str, field: Any) -> str:
    env = "PROTEGE_" + dotted.upper().replace(".", "__")
    if field.default_factory is not None:
        default = field.default_factory()
    else:
        default = field.default
    if isinstance(default, Path):
        default = str(default).replace(str(Path.home()), "~")
    shown = "" if default is None else f"`{default}`"
    description = (field.description or "").replace("|", "\\|")
    return f"| `{dotted}` | `{env}` | {shown} | {description} |"


def _write_readme_reference(readme: Path) -> None:
    text = readme.read_text()
    start_marker, end_marker = "<!-- settings-reference:start -->", "<!-- settings-reference:end -->"
    start = text.index(start_marker) + len(start_marker)
    end = text.index(end_marker)
    readme.write_text(text[:start] + "\n" + settings_reference() + "\n" + text[end:])


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-readme"]:
        _write_readme_reference(Path(__file__).resolve().parent.parent / "README.md")
    else:
        print(settings_reference())
