from crowdsft.v1 import envelope_pb2 as _envelope_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetCoordinatorInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CoordinatorInfo(_message.Message):
    __slots__ = ("public_key", "protocol", "admission_policy", "max_examples_per_contribution", "max_field_bytes", "max_message_bytes", "timestamp_window_s", "server_version")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_PER_CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    protocol: str
    admission_policy: str
    max_examples_per_contribution: int
    max_field_bytes: int
    max_message_bytes: int
    timestamp_window_s: int
    server_version: str
    def __init__(self, public_key: _Optional[bytes] = ..., protocol: _Optional[str] = ..., admission_policy: _Optional[str] = ..., max_examples_per_contribution: _Optional[int] = ..., max_field_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., timestamp_window_s: _Optional[int] = ..., server_version: _Optional[str] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("node_id", "registered_at_ms", "newly_registered")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    NEWLY_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    registered_at_ms: int
    newly_registered: bool
    def __init__(self, node_id: _Optional[str] = ..., registered_at_ms: _Optional[int] = ..., newly_registered: _Optional[bool] = ...) -> None: ...

class SubmitContributionResponse(_message.Message):
    __slots__ = ("receipt",)
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    receipt: _envelope_pb2.SignedReceipt
    def __init__(self, receipt: _Optional[_Union[_envelope_pb2.SignedReceipt, _Mapping]] = ...) -> None: ...

class SubmitResult(_message.Message):
    __slots__ = ("index", "contribution_id", "code", "message", "receipt", "retry_after_ms")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    index: int
    contribution_id: bytes
    code: int
    message: str
    receipt: _envelope_pb2.SignedReceipt
    retry_after_ms: int
    def __init__(self, index: _Optional[int] = ..., contribution_id: _Optional[bytes] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., receipt: _Optional[_Union[_envelope_pb2.SignedReceipt, _Mapping]] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class RoundParticipation(_message.Message):
    __slots__ = ("round_id", "group", "rank", "points_before", "points_after")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    POINTS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    POINTS_AFTER_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    group: int
    rank: int
    points_before: float
    points_after: float
    def __init__(self, round_id: _Optional[int] = ..., group: _Optional[int] = ..., rank: _Optional[int] = ..., points_before: _Optional[float] = ..., points_after: _Optional[float] = ...) -> None: ...

class WatchRoundsRequest(_message.Message):
    __slots__ = ("after_round_id",)
    AFTER_ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    after_round_id: int
    def __init__(self, after_round_id: _Optional[int] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("round_id", "kind", "groups", "contributors", "scores", "base_score", "updated", "winner", "time_ms", "evaluation")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BASE_SCORE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    kind: str
    groups: int
    contributors: int
    scores: _containers.RepeatedScalarFieldContainer[float]
    base_score: float
    updated: bool
    winner: int
    time_ms: int
    evaluation: str
    def __init__(self, round_id: _Optional[int] = ..., kind: _Optional[str] = ..., groups: _Optional[int] = ..., contributors: _Optional[int] = ..., scores: _Optional[_Iterable[float]] = ..., base_score: _Optional[float] = ..., updated: _Optional[bool] = ..., winner: _Optional[int] = ..., time_ms: _Optional[int] = ..., evaluation: _Optional[str] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "registered", "contributions", "examples", "points", "registered_at_ms", "display_name", "rounds")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    registered: bool
    contributions: int
    examples: int
    points: float
    registered_at_ms: int
    display_name: str
    rounds: _containers.RepeatedCompositeFieldContainer[RoundParticipation]
    def __init__(self, node_id: _Optional[str] = ..., registered: _Optional[bool] = ..., contributions: _Optional[int] = ..., examples: _Optional[int] = ..., points: _Optional[float] = ..., registered_at_ms: _Optional[int] = ..., display_name: _Optional[str] = ..., rounds: _Optional[_Iterable[_Union[RoundParticipation, _Mapping]]] = ...) -> None: ...

class GetLedgerRequest(_message.Message):
    __slots__ = ("after_round_id",)
    AFTER_ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    after_round_id: int
    def __init__(self, after_round_id: _Optional[int] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("round_id", "record", "signature")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    record: bytes
    signature: bytes
    def __init__(self, round_id: _Optional[int] = ..., record: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class InclusionProofsRequest(_message.Message):
    __slots__ = ("contribution_ids",)
    CONTRIBUTION_IDS_FIELD_NUMBER: _ClassVar[int]
    contribution_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, contribution_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class InclusionProof(_message.Message):
    __slots__ = ("contribution_id", "round_id", "leaf_index", "tree_size", "path")
    CONTRIBUTION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    contribution_id: bytes
    round_id: int
    leaf_index: int
    tree_size: int
    path: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, contribution_id: _Optional[bytes] = ..., round_id: _Optional[int] = ..., leaf_index: _Optional[int] = ..., tree_size: _Optional[int] = ..., path: _Optional[_Iterable[bytes]] = ...) -> None: ...

class InclusionProofs(_message.Message):
    __slots__ = ("proofs",)
    PROOFS_FIELD_NUMBER: _ClassVar[int]
    proofs: _containers.RepeatedCompositeFieldContainer[InclusionProof]
    def __init__(self, proofs: _Optional[_Iterable[_Union[InclusionProof, _Mapping]]] = ...) -> None: ...

class GetTreeHeadRequest(_message.Message):
    __slots__ = ("first_size",)
    FIRST_SIZE_FIELD_NUMBER: _ClassVar[int]
    first_size: int
    def __init__(self, first_size: _Optional[int] = ...) -> None: ...

class TreeHead(_message.Message):
    __slots__ = ("head", "signature", "consistency")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    head: bytes
    signature: bytes
    consistency: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, head: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., consistency: _Optional[_Iterable[bytes]] = ...) -> None: ...
