"""TensorFlow's frozen ``GraphDef`` protobuf, read and written without TensorFlow or the protobuf package.

Only what a frozen inference graph uses is decoded: ``GraphDef.node`` / ``versions``, ``NodeDef`` (name, op,
inputs, device, attrs), ``AttrValue`` (s, i, f, b, type, shape, tensor and lists of them) and ``TensorProto``
(dtype, shape, ``tensor_content`` or the typed ``*_val`` fields, which TF fills up by repeating the last value).
Field numbers are those of tensorflow/core/framework/{graph,node_def,attr_value,tensor,tensor_shape,versions}.proto.
Unknown fields are skipped, as protobuf does. A damaged file raises :class:`GraphDefError` naming it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

# tensorflow/core/framework/types.proto
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_STRING, DT_INT64, DT_BOOL, DT_HALF = 1, 2, 3, 4, 7, 9, 10, 19
_NP = {DT_FLOAT: np.float32, DT_DOUBLE: np.float64, DT_INT32: np.int32, DT_UINT8: np.uint8, DT_INT64: np.int64,
       DT_BOOL: np.bool_, DT_HALF: np.float16}


class GraphDefError(ValueError):
    """A file that is not a (readable) TensorFlow GraphDef."""


# --------------------------------------------------------------------------- wire format
def _varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise GraphDefError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise GraphDefError("varint too long")


def _fields(buf: memoryview) -> Iterator[Tuple[int, int, object]]:
    """(field number, wire type, value): ints for varint/fixed, memoryviews for length-delimited."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            if pos + 8 > end:
                raise GraphDefError("truncated fixed64")
            val, pos = bytes(buf[pos:pos + 8]), pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise GraphDefError(f"truncated field {num}: {n} bytes announced, {end - pos} left")
            val, pos = buf[pos:pos + n], pos + n
        elif wt == 5:
            if pos + 4 > end:
                raise GraphDefError("truncated fixed32")
            val, pos = bytes(buf[pos:pos + 4]), pos + 4
        else:
            raise GraphDefError(f"unsupported wire type {wt} (field {num})")
        yield num, wt, val


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _packed_varints(val, wt) -> List[int]:
    if wt == 0:
        return [_signed64(val)]
    out, pos, buf = [], 0, val
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(_signed64(v))
    return out


def _packed_fixed(val, wt, fmt: str, size: int) -> list:
    if wt in (1, 5):
        return [struct.unpack("<" + fmt, val)[0]]
    raw = bytes(val)
    return list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))


def _enc_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(num: int, wt: int) -> bytes:
    return _enc_varint((num << 3) | wt)


def _len_field(num: int, payload: bytes) -> bytes:
    return _key(num, 2) + _enc_varint(len(payload)) + payload


def _int_field(num: int, v: int) -> bytes:
    return _key(num, 0) + _enc_varint(int(v))


# --------------------------------------------------------------------------- messages
@dataclass
class Tensor:
    dtype: int
    shape: Tuple[int, ...]
    array: np.ndarray


@dataclass
class Node:
    name: str
    op: str
    inputs: List[str] = field(default_factory=list)
    attr: Dict[str, object] = field(default_factory=dict)
    device: str = ""


@dataclass
class Graph:
    nodes: List[Node]
    producer: int = 0
    min_consumer: int = 0

    def by_name(self) -> Dict[str, Node]:
        return {n.name: n for n in self.nodes}


def _shape(buf) -> Tuple[int, ...]:
    dims = []
    for num, _wt, val in _fields(buf):
        if num == 2:
            size = 0
            for n2, _w2, v2 in _fields(val):
                if n2 == 1:
                    size = _signed64(v2)
            dims.append(size)
    return tuple(dims)


def _tensor(buf) -> Tensor:
    dtype, shape, content = 0, (), None
    vals: Dict[int, list] = {}
    for num, wt, val in _fields(buf):
        if num == 1:
            dtype = val
        elif num == 2:
            shape = _shape(val)
        elif num == 4:
            content = bytes(val)
        elif num == 5:
            vals.setdefault(5, []).extend(_packed_fixed(val, wt, "f", 4))
        elif num == 6:
            vals.setdefault(6, []).extend(_packed_fixed(val, wt, "d", 8))
        elif num in (7, 10, 11, 13):
            vals.setdefault(num, []).extend(_packed_varints(val, wt))
        elif num == 8:
            vals.setdefault(8, []).append(bytes(val))
    if dtype == DT_STRING:
        return Tensor(dtype, shape, np.array(vals.get(8, []), dtype=object))
    if dtype not in _NP:
        raise GraphDefError(f"tensor dtype {dtype} is not supported")
    npt = _NP[dtype]
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        arr = np.frombuffer(content, dtype=np.dtype(npt).newbyteorder("<")).astype(npt)
    else:
        src = {DT_FLOAT: 5, DT_DOUBLE: 6, DT_INT32: 7, DT_UINT8: 7, DT_INT64: 10, DT_BOOL: 11, DT_HALF: 13}[dtype]
        raw = vals.get(src, [])
        if dtype == DT_HALF:
            arr = np.array(raw, dtype=np.uint16).view(np.float16)
        else:
            arr = np.array(raw, dtype=npt)
        if 0 < len(arr) < count:                     # TF repeats the last value to fill the shape
            arr = np.concatenate([arr, np.full(count - len(arr), arr[-1], dtype=arr.dtype)])
        elif len(arr) == 0:
            arr = np.zeros(count, dtype=npt)
    if arr.size != count:
        raise GraphDefError(f"tensor of shape {shape} holds {arr.size} values")
    return Tensor(dtype, shape, arr.reshape(shape))


def _attr(buf):
    for num, wt, val in _fields(buf):
        if num == 2:
            return bytes(val)
        if num == 3:
            return _signed64(val)
        if num == 4:
            return struct.unpack("<f", val)[0]
        if num == 5:
            return bool(val)
        if num == 6:
            return ("type", val)
        if num == 7:
            return ("shape", _shape(val))
        if num == 8:
            return _tensor(val)
        if num == 1:
            items: list = []
            for n2, w2, v2 in _fields(val):
                if n2 == 2:
                    items.append(bytes(v2))
                elif n2 == 3:
                    items.extend(_packed_varints(v2, w2))
                elif n2 == 4:
                    items.extend(_packed_fixed(v2, w2, "f", 4))
                elif n2 == 5:
                    items.extend(bool(x) for x in _packed_varints(v2, w2))
                elif n2 == 6:
                    items.extend(("type", x) for x in _packed_varints(v2, w2))
                elif n2 == 7:
                    items.append(("shape", _shape(v2)))
                elif n2 == 8:
                    items.append(_tensor(v2))
            return items
    return None


def _node(buf) -> Node:
    n = Node("", "")
    for num, _wt, val in _fields(buf):
        if num == 1:
            n.name = bytes(val).decode()
        elif num == 2:
            n.op = bytes(val).decode()
        elif num == 3:
            n.inputs.append(bytes(val).decode())
        elif num == 4:
            n.device = bytes(val).decode()
        elif num == 5:
            key, value = "", None
            for n2, _w2, v2 in _fields(val):
                if n2 == 1:
                    key = bytes(v2).decode()
                elif n2 == 2:
                    value = _attr(v2)
            n.attr[key] = value
    return n


def parse_graph(data: bytes, source: str = "GraphDef") -> Graph:
    """Decode a serialised GraphDef; :class:`GraphDefError` names ``source`` when it is not one."""
    try:
        nodes, producer, min_consumer = [], 0, 0
        for num, wt, val in _fields(memoryview(data)):
            if num == 1 and wt == 2:
                nodes.append(_node(val))
            elif num == 4 and wt == 2:
                for n2, _w2, v2 in _fields(val):
                    if n2 == 1:
                        producer = v2
                    elif n2 == 2:
                        min_consumer = v2
    except (GraphDefError, UnicodeDecodeError, struct.error) as e:
        raise GraphDefError(f"{source} is not a TensorFlow GraphDef (or is damaged): {e}") from None
    if not nodes or any(not n.name or not n.op for n in nodes):
        raise GraphDefError(f"{source} is not a TensorFlow GraphDef: no nodes with a name and an op")
    return Graph(nodes, producer, min_consumer)


def read_graph(path: str) -> Graph:
    with open(path, "rb") as f:
        return parse_graph(f.read(), path)


# --------------------------------------------------------------------------- writing
def encode_tensor(arr: np.ndarray, dtype: Optional[int] = None) -> bytes:
    arr = np.asarray(arr)
    if dtype is None:
        dtype = {np.dtype(v): k for k, v in _NP.items()}[arr.dtype]
    shape = b"".join(_len_field(2, _int_field(1, d)) for d in arr.shape)
    out = _int_field(1, dtype) + _len_field(2, shape)
    return out + _len_field(4, np.ascontiguousarray(arr, dtype=np.dtype(_NP[dtype]).newbyteorder("<")).tobytes())


def _encode_attr(value) -> bytes:
    """Python value -> AttrValue: bytes/str -> s, bool -> b, int -> i, float -> f, ("type", n) -> type,
    ("shape", dims) -> shape, np.ndarray -> tensor, list of ints -> list.i."""
    if isinstance(value, (bytes, str)):
        return _len_field(2, value.encode() if isinstance(value, str) else value)
    if isinstance(value, bool):
        return _int_field(5, int(value))
    if isinstance(value, int):
        return _int_field(3, value)
    if isinstance(value, float):
        return _key(4, 5) + struct.pack("<f", value)
    if isinstance(value, tuple) and value and value[0] == "type":
        return _int_field(6, value[1])
    if isinstance(value, tuple) and value and value[0] == "shape":
        return _len_field(7, b"".join(_len_field(2, _int_field(1, d)) for d in value[1]))
    if isinstance(value, np.ndarray):
        return _len_field(8, encode_tensor(value))
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return _len_field(1, _len_field(3, b"".join(_enc_varint(v) for v in value)))
    raise TypeError(f"cannot encode attr value {value!r}")


def encode_node(name: str, op: str, inputs=(), attr: Optional[dict] = None) -> bytes:
    out = _len_field(1, name.encode()) + _len_field(2, op.encode())
    for i in inputs:
        out += _len_field(3, i.encode())
    for k in sorted(attr or {}):
        out += _len_field(5, _len_field(1, k.encode()) + _len_field(2, _encode_attr(attr[k])))
    return out


def encode_graph(nodes: List[bytes], producer: int) -> bytes:
    return b"".join(_len_field(1, n) for n in nodes) + _len_field(4, _int_field(1, producer))
