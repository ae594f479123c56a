from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Example(_message.Message):
    __slots__ = ("prompt", "response", "system", "history")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    system: str
    history: _containers.RepeatedCompositeFieldContainer[Turn]
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ..., system: _Optional[str] = ..., history: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("user", "assistant")
    USER_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_FIELD_NUMBER: _ClassVar[int]
    user: str
    assistant: str
    def __init__(self, user: _Optional[str] = ..., assistant: _Optional[str] = ...) -> None: ...

class ContributionMetadata(_message.Message):
    __slots__ = ("license", "consent", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    license: str
    consent: bool
    labels: _containers.ScalarMap[str, str]
    def __init__(self, license: _Optional[str] = ..., consent: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ContributionPayload(_message.Message):
    __slots__ = ("examples", "nonce", "timestamp_ms", "metadata", "coordinator_key")
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_KEY_FIELD_NUMBER: _ClassVar[int]
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    nonce: bytes
    timestamp_ms: int
    metadata: ContributionMetadata
    coordinator_key: bytes
    def __init__(self, examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., nonce: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., metadata: _Optional[_Union[ContributionMetadata, _Mapping]] = ..., coordinator_key: _Optional[bytes] = ...) -> None: ...

class RegisterPayload(_message.Message):
    __slots__ = ("nonce", "timestamp_ms", "display_name", "invite_token", "coordinator_key")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    INVITE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_KEY_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    timestamp_ms: int
    display_name: str
    invite_token: str
    coordinator_key: bytes
    def __init__(self, nonce: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., display_name: _Optional[str] = ..., invite_token: _Optional[str] = ..., coordinator_key: _Optional[bytes] = ...) -> None: ...

class StatusRequestPayload(_message.Message):
    __slots__ = ("nonce", "timestamp_ms", "coordinator_key")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_KEY_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    timestamp_ms: int
    coordinator_key: bytes
    def __init__(self, nonce: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., coordinator_key: _Optional[bytes] = ...) -> None: ...
