from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    FLOAT64: _ClassVar[DataType]
    INT8: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
    INT32: _ClassVar[DataType]
    INT64: _ClassVar[DataType]
    BOOL: _ClassVar[DataType]

class QuantScheme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANT_SCHEME_UNSPECIFIED: _ClassVar[QuantScheme]
    PER_TENSOR: _ClassVar[QuantScheme]
    PER_CHANNEL: _ClassVar[QuantScheme]

class BitOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BIT_ORDER_UNSPECIFIED: _ClassVar[BitOrder]
    LSB_FIRST: _ClassVar[BitOrder]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    ZSTD: _ClassVar[Compression]
    LZ4: _ClassVar[Compression]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT16: DataType
FLOAT64: DataType
INT8: DataType
UINT8: DataType
INT32: DataType
INT64: DataType
BOOL: DataType
QUANT_SCHEME_UNSPECIFIED: QuantScheme
PER_TENSOR: QuantScheme
PER_CHANNEL: QuantScheme
BIT_ORDER_UNSPECIFIED: BitOrder
LSB_FIRST: BitOrder
COMPRESSION_NONE: Compression
ZSTD: Compression
LZ4: Compression

class Quantization(_message.Message):
    __slots__ = ("bits", "scheme", "axis", "scales", "zero_points", "bit_order")
    BITS_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINTS_FIELD_NUMBER: _ClassVar[int]
    BIT_ORDER_FIELD_NUMBER: _ClassVar[int]
    bits: int
    scheme: QuantScheme
    axis: int
    scales: _containers.RepeatedScalarFieldContainer[float]
    zero_points: _containers.RepeatedScalarFieldContainer[int]
    bit_order: BitOrder
    def __init__(self, bits: _Optional[int] = ..., scheme: _Optional[_Union[QuantScheme, str]] = ..., axis: _Optional[int] = ..., scales: _Optional[_Iterable[float]] = ..., zero_points: _Optional[_Iterable[int]] = ..., bit_order: _Optional[_Union[BitOrder, str]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "quantization", "compression")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    quantization: Quantization
    compression: Compression
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., quantization: _Optional[_Union[Quantization, _Mapping]] = ..., compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class EdgeTiming(_message.Message):
    __slots__ = ("capture_unix_ns", "send_unix_ns", "head_ms", "encode_ms", "queue_ms")
    CAPTURE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    SEND_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    HEAD_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    capture_unix_ns: int
    send_unix_ns: int
    head_ms: float
    encode_ms: float
    queue_ms: float
    def __init__(self, capture_unix_ns: _Optional[int] = ..., send_unix_ns: _Optional[int] = ..., head_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "model", "plan_sha256", "cut_id", "tensors", "edge_timing", "top_k", "return_outputs", "measure_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    CUT_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    EDGE_TIMING_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MEASURE_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    model: str
    plan_sha256: str
    cut_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    edge_timing: EdgeTiming
    top_k: int
    return_outputs: bool
    measure_only: bool
    def __init__(self, request_id: _Optional[int] = ..., model: _Optional[str] = ..., plan_sha256: _Optional[str] = ..., cut_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., edge_timing: _Optional[_Union[EdgeTiming, _Mapping]] = ..., top_k: _Optional[int] = ..., return_outputs: _Optional[bool] = ..., measure_only: _Optional[bool] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class ServerTiming(_message.Message):
    __slots__ = ("receive_unix_ns", "bytes_received", "queue_ms", "compute_ms", "decode_ms", "batch_size")
    RECEIVE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    receive_unix_ns: int
    bytes_received: int
    queue_ms: float
    compute_ms: float
    decode_ms: float
    batch_size: int
    def __init__(self, receive_unix_ns: _Optional[int] = ..., bytes_received: _Optional[int] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "outputs", "topk", "timing", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    topk: _containers.RepeatedCompositeFieldContainer[ClassScore]
    timing: ServerTiming
    error: Status
    def __init__(self, request_id: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., topk: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class CutInfo(_message.Message):
    __slots__ = ("id", "tensors")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    id: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class BundleInfo(_message.Message):
    __slots__ = ("model", "plan_sha256", "inputs", "cuts", "outputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    plan_sha256: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    cuts: _containers.RepeatedCompositeFieldContainer[CutInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, model: _Optional[str] = ..., plan_sha256: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., cuts: _Optional[_Iterable[_Union[CutInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("bundles", "server_version", "max_message_bytes")
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[BundleInfo]
    server_version: str
    max_message_bytes: int
    def __init__(self, bundles: _Optional[_Iterable[_Union[BundleInfo, _Mapping]]] = ..., server_version: _Optional[str] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
