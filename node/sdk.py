"""The contributor's Python SDK: ``from crowdsft import Node``.

    from crowdsft import Node

    with Node("127.0.0.1:50051", key="~/.crowdsft/node.key") as node:
        receipts = node.submit([{"prompt": "What is 2+2?", "response": "4"}])
        print(node.status()["points"], node.verify().ok)

It does what the ``crowdsft node`` commands do, with the same guarantees: every example is
checked before anything is sent; each contribution is signed once and its bytes kept in the
node's state folder, so an interrupted ``submit`` resumes (and a repeated one sends nothing
new) and retries resend identical bytes; the coordinator's key is pinned on first use; every
receipt is verified before it is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdsft.datafiles import Record, records_from_dicts
from crowdsft.envelope import now_ms
from crowdsft.keys import Identity, load_private_key, passphrase_from_env
from crowdsft.v1 import envelope_pb2

from .client import CoordinatorClient, TLSClient
from .state import NodeState, default_key_path
from .submit import Metadata, UploadReport, chunk_key, upload
from .verify import NodeVerification, held_receipts, verify_node
from .watch import event_dict, follow_rounds, participation_dicts


@dataclass(frozen=True)
class Receipt:
    """The coordinator's signed acknowledgement of one contribution (verified on arrival)."""

    contribution_id: str  # hex
    node_id: str
    accepted_at_ms: int
    examples: int  # the examples of this submit call in the contribution
    receipt: bytes  # the signed crowdsft.v1.Receipt
    signature: bytes  # the coordinator's Ed25519 signature over ``receipt``


@dataclass(frozen=True)
class SubmitResult:
    """What ``Node.submit`` did: the receipts (one per contribution of the call, in order,
    including those submitted by an earlier call) and the counts of the upload."""

    receipts: list[Receipt]
    report: UploadReport

    def __iter__(self) -> Iterator[Receipt]:
        return iter(self.receipts)

    def __len__(self) -> int:
        return len(self.receipts)


class Node:
    """A contributor's node: its key, a coordinator, and the local state that makes
    submissions resumable.

    ``key``: an ``Identity``, or the path of a key file (``crowdsft node keygen``; default:
    the node's default key), read with the passphrase in the environment variable
    ``passphrase_env`` where the file is encrypted. ``home``: the state folder (default:
    ``CROWDSFT_HOME`` or the platform's). ``tls``: a ``TLSClient`` for TLS coordinators.
    ``trust_new_coordinator_key``: accept a coordinator key that differs from the one
    pinned for this address (after the operator announced a new key)."""

    def __init__(
        self,
        coordinator: str,
        key: Identity | str | Path | None = None,
        *,
        passphrase_env: str = "CROWDSFT_KEY_PASSPHRASE",
        home: Path | None = None,
        tls: TLSClient | None = None,
        timeout: float = 30.0,
        trust_new_coordinator_key: bool = False,
    ) -> None:
        if isinstance(key, Identity):
            self.identity = key
        else:
            path = Path(key).expanduser() if key is not None else default_key_path()
            self.identity = load_private_key(path, passphrase_from_env(passphrase_env))
        self.home = home
        self.trust_new_coordinator_key = trust_new_coordinator_key
        self.client = CoordinatorClient(coordinator, timeout=timeout, tls=tls)

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _state(self) -> NodeState:
        return NodeState.for_node(self.node_id, self.home)

    def register(self, name: str = "", invite: str = "") -> bool:
        """Register with the coordinator (needed first where it admits by invitation);
        True when this call registered the node, False when it already was."""
        return bool(self.client.register(self.identity, name, invite.strip()).newly_registered)

    def submit(
        self,
        examples: Iterable[Mapping[str, Any]],
        *,
        examples_per_contribution: int = 1,
        license: str = "",
        consent: bool = False,
        source: str = "sdk",
    ) -> SubmitResult:
        """Sign and submit ``examples`` (dicts with ``prompt``, ``response`` and optional
        ``system`` and ``history``, or a chat ``messages`` list, a whole conversation
        allowed), ``examples_per_contribution`` per
        contribution. Every example is checked first (InputError naming each bad item by
        its index; nothing is sent). Resumes an interrupted upload of the same examples and
        sends nothing already receipted; rejected contributions are in
        ``result.report.failures``."""
        records = records_from_dicts(examples, "examples")
        metadata = Metadata(license=license, consent=consent)
        with self._state() as state:
            report = upload(
                self.client,
                self.identity,
                state,
                records,
                source_name=source,
                examples_per_contribution=examples_per_contribution,
                metadata=metadata,
                trust_new_key=self.trust_new_coordinator_key,
            )
            info = self.client.info()
            coord_key = info.public_key
            # as upload split them: at most the coordinator's examples per contribution
            limits_k = max(1, min(examples_per_contribution, info.max_examples_per_contribution))
            receipts = []
            for i in range(0, len(records), limits_k):
                chunk: list[Record] = records[i : i + limits_k]
                sub = state.get(coord_key, chunk_key(chunk, metadata))
                if sub is None or sub.receipt is None:
                    continue  # rejected: see report.failures
                r = envelope_pb2.Receipt.FromString(sub.receipt)
                receipts.append(
                    Receipt(
                        contribution_id=r.contribution_id.hex(),
                        node_id=r.node_id,
                        accepted_at_ms=r.accepted_at_ms,
                        examples=len(chunk),
                        receipt=sub.receipt,
                        signature=sub.receipt_signature or b"",
                    )
                )
        return SubmitResult(receipts, report)

    def status(self) -> dict[str, Any]:
        """This node's standing at the coordinator: contributions, examples, points awarded
        so far (from 0), and the rounds it took part in."""
        st = self.client.status(self.identity)
        coord_key = self.client.info().public_key
        with self._state() as state:
            held = len(state.receipts(coord_key))
        return {
            "node_id": st.node_id,
            "registered": st.registered,
            "registered_at_ms": st.registered_at_ms if st.registered else None,
            "contributions": st.contributions,
            "examples": st.examples,
            "points": st.points,
            "receipts_held": held,
            "rounds": participation_dicts(st),
        }

    def verify(self) -> NodeVerification:
        """Check the coordinator's ledger against this node's receipts (``node verify``):
        ``.ok``, ``.problems`` and the counts."""
        key = self.client.info().public_key
        with self._state() as state:
            state.pin(self.client.address, key, now_ms(), self.trust_new_coordinator_key)
            receipts = held_receipts(state, key)
        return verify_node(self.client, self.identity, key, receipts)

    def watch(self, after: int = 0) -> Iterator[dict[str, Any]]:
        """Round events after round ``after`` as they happen, until you stop iterating
        (dicts: ``round_id``, ``kind`` "planned" or "finished", ``groups``,
        ``contributors``; finished events add ``scores``, ``base_score``, ``updated`` and
        ``winner``). Reconnects through coordinator restarts without repeating an event."""
        events = follow_rounds(self.client, after)
        try:
            for ev in events:
                yield event_dict(ev)
        finally:
            events.close()
