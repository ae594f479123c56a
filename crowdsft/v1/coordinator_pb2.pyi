from crowdsft.v1 import envelope_pb2 as _envelope_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
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

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "registered", "contributions", "examples", "points", "registered_at_ms", "display_name")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    registered: bool
    contributions: int
    examples: int
    points: float
    registered_at_ms: int
    display_name: str
    def __init__(self, node_id: _Optional[str] = ..., registered: _Optional[bool] = ..., contributions: _Optional[int] = ..., examples: _Optional[int] = ..., points: _Optional[float] = ..., registered_at_ms: _Optional[int] = ..., display_name: _Optional[str] = ...) -> None: ...
