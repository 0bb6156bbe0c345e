from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class TensorCoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_CODING_RAW: _ClassVar[TensorCoding]
    TENSOR_CODING_SORTED_DELTA: _ClassVar[TensorCoding]
DTYPE_UNSPECIFIED: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_UINT8: DType
TENSOR_CODING_RAW: TensorCoding
TENSOR_CODING_SORTED_DELTA: TensorCoding

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "packed_bits", "coding")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PACKED_BITS_FIELD_NUMBER: _ClassVar[int]
    CODING_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    packed_bits: int
    coding: TensorCoding
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., packed_bits: _Optional[int] = ..., coding: _Optional[_Union[TensorCoding, str]] = ...) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("k", "temperatures", "value_dtype", "layers", "states", "state_dtype", "pack_ids", "num_samples", "sample_temperature", "sample_seed", "sample_tail", "part_options")
    class PartOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    STATE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PACK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TAIL_FIELD_NUMBER: _ClassVar[int]
    PART_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    k: int
    temperatures: _containers.RepeatedScalarFieldContainer[float]
    value_dtype: DType
    layers: _containers.RepeatedScalarFieldContainer[int]
    states: _containers.RepeatedScalarFieldContainer[str]
    state_dtype: DType
    pack_ids: bool
    num_samples: int
    sample_temperature: float
    sample_seed: int
    sample_tail: bool
    part_options: _containers.MessageMap[str, Tensor]
    def __init__(self, k: _Optional[int] = ..., temperatures: _Optional[_Iterable[float]] = ..., value_dtype: _Optional[_Union[DType, str]] = ..., layers: _Optional[_Iterable[int]] = ..., states: _Optional[_Iterable[str]] = ..., state_dtype: _Optional[_Union[DType, str]] = ..., pack_ids: _Optional[bool] = ..., num_samples: _Optional[int] = ..., sample_temperature: _Optional[float] = ..., sample_seed: _Optional[int] = ..., sample_tail: _Optional[bool] = ..., part_options: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("request_id", "tokens", "segment_ids", "positions", "spec", "example_ids", "part_inputs")
    class PartInputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    PART_INPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    tokens: Tensor
    segment_ids: Tensor
    positions: Tensor
    spec: OutputSpec
    example_ids: Tensor
    part_inputs: _containers.MessageMap[str, Tensor]
    def __init__(self, request_id: _Optional[int] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ..., segment_ids: _Optional[_Union[Tensor, _Mapping]] = ..., positions: _Optional[_Union[Tensor, _Mapping]] = ..., spec: _Optional[_Union[OutputSpec, _Mapping]] = ..., example_ids: _Optional[_Union[Tensor, _Mapping]] = ..., part_inputs: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class ReplicaIdentity(_message.Message):
    __slots__ = ("replica_id", "weights_fingerprint")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    weights_fingerprint: str
    def __init__(self, replica_id: _Optional[str] = ..., weights_fingerprint: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("request_id", "topk_ids", "topk_logits", "logsumexp", "temperatures", "state_layers", "layer_states", "error", "replica", "sample_counts", "sample_ids", "sample_logits", "sample_logsumexp", "sample_temperature", "sample_skip", "part_outputs")
    class LayerStatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class PartOutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOGSUMEXP_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_FIELD_NUMBER: _ClassVar[int]
    STATE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_STATES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LOGSUMEXP_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SKIP_FIELD_NUMBER: _ClassVar[int]
    PART_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    topk_ids: Tensor
    topk_logits: Tensor
    logsumexp: Tensor
    temperatures: _containers.RepeatedScalarFieldContainer[float]
    state_layers: _containers.RepeatedScalarFieldContainer[int]
    layer_states: _containers.MessageMap[str, Tensor]
    error: Error
    replica: ReplicaIdentity
    sample_counts: Tensor
    sample_ids: Tensor
    sample_logits: Tensor
    sample_logsumexp: Tensor
    sample_temperature: float
    sample_skip: int
    part_outputs: _containers.MessageMap[str, Tensor]
    def __init__(self, request_id: _Optional[int] = ..., topk_ids: _Optional[_Union[Tensor, _Mapping]] = ..., topk_logits: _Optional[_Union[Tensor, _Mapping]] = ..., logsumexp: _Optional[_Union[Tensor, _Mapping]] = ..., temperatures: _Optional[_Iterable[float]] = ..., state_layers: _Optional[_Iterable[int]] = ..., layer_states: _Optional[_Mapping[str, Tensor]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., replica: _Optional[_Union[ReplicaIdentity, _Mapping]] = ..., sample_counts: _Optional[_Union[Tensor, _Mapping]] = ..., sample_ids: _Optional[_Union[Tensor, _Mapping]] = ..., sample_logits: _Optional[_Union[Tensor, _Mapping]] = ..., sample_logsumexp: _Optional[_Union[Tensor, _Mapping]] = ..., sample_temperature: _Optional[float] = ..., sample_skip: _Optional[int] = ..., part_outputs: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class Bucket(_message.Message):
    __slots__ = ("batch", "length")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    batch: int
    length: int
    def __init__(self, batch: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_k", "max_batch", "max_tokens_per_request", "max_temperatures", "max_seq_len", "selectable_layers", "max_message_bytes", "max_samples", "max_request_bytes", "max_streams_per_connection", "stream_window_bytes", "part_limits")
    class PartLimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TEMPERATURES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    SELECTABLE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_PER_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    STREAM_WINDOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    PART_LIMITS_FIELD_NUMBER: _ClassVar[int]
    max_k: int
    max_batch: int
    max_tokens_per_request: int
    max_temperatures: int
    max_seq_len: int
    selectable_layers: _containers.RepeatedScalarFieldContainer[int]
    max_message_bytes: int
    max_samples: int
    max_request_bytes: int
    max_streams_per_connection: int
    stream_window_bytes: int
    part_limits: _containers.ScalarMap[str, int]
    def __init__(self, max_k: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., max_temperatures: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., selectable_layers: _Optional[_Iterable[int]] = ..., max_message_bytes: _Optional[int] = ..., max_samples: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_streams_per_connection: _Optional[int] = ..., stream_window_bytes: _Optional[int] = ..., part_limits: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model_type", "vocab_size", "padded_vocab_size", "num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "value_dtypes", "state_dtypes", "state_names", "limits", "weights_fingerprint", "tokenizer_fingerprint", "buckets", "server_version", "packed_id_bits", "serves_parameters", "replica_id")
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PADDED_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEY_VALUE_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    STATE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    STATE_NAMES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PACKED_ID_BITS_FIELD_NUMBER: _ClassVar[int]
    SERVES_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    vocab_size: int
    padded_vocab_size: int
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    value_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    state_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    state_names: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    weights_fingerprint: str
    tokenizer_fingerprint: str
    buckets: _containers.RepeatedCompositeFieldContainer[Bucket]
    server_version: str
    packed_id_bits: int
    serves_parameters: bool
    replica_id: str
    def __init__(self, model_type: _Optional[str] = ..., vocab_size: _Optional[int] = ..., padded_vocab_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_key_value_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., max_position_embeddings: _Optional[int] = ..., value_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., state_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., state_names: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., weights_fingerprint: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., buckets: _Optional[_Iterable[_Union[Bucket, _Mapping]]] = ..., server_version: _Optional[str] = ..., packed_id_bits: _Optional[int] = ..., serves_parameters: _Optional[bool] = ..., replica_id: _Optional[str] = ...) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ("name_regex", "chunk_bytes", "names_only", "start_name", "start_offset")
    NAME_REGEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    NAMES_ONLY_FIELD_NUMBER: _ClassVar[int]
    START_NAME_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    name_regex: str
    chunk_bytes: int
    names_only: bool
    start_name: str
    start_offset: int
    def __init__(self, name_regex: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., names_only: _Optional[bool] = ..., start_name: _Optional[str] = ..., start_offset: _Optional[int] = ...) -> None: ...

class ParameterChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "total_bytes", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    total_bytes: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
