"""The Q/DQ node patterns of the QDQ export, built in one place.

The export writes them and the int4 probe (``archnet.quant.int4``) runs them, so what the
probe finds onnxruntime does correctly is exactly what the export relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from archnet.errors import ArchnetError

__all__ = [
    "STORAGE",
    "Emitted",
    "Storage",
    "activation_qdq",
    "integer_tensor",
    "storage_for",
    "weight_dq",
]


@dataclass(frozen=True)
class Storage:
    """An ONNX integer type that quantized values are stored in."""

    name: str
    onnx_type: int
    bits: int
    signed: bool

    @property
    def qrange(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1


STORAGE: dict[str, Storage] = {
    s.name: s
    for s in (
        Storage("int8", TensorProto.INT8, 8, True),
        Storage("uint8", TensorProto.UINT8, 8, False),
        Storage("int4", TensorProto.INT4, 4, True),
        Storage("uint4", TensorProto.UINT4, 4, False),
    )
}


def storage_for(signed: bool, four_bit: bool) -> Storage:
    """The storage type of a signed/unsigned tensor, 4-bit or 8-bit."""
    return STORAGE[("" if signed else "u") + ("int4" if four_bit else "int8")]


def integer_tensor(name: str, values: np.ndarray, storage: Storage) -> onnx.TensorProto:
    """An initializer of integers in ``storage``; 4-bit values packed two per byte.

    Packed raw data is what makes 4-bit storage half the size on disk (ONNX's typed field
    would spend a varint per pair).
    """
    q = np.asarray(values)
    lo, hi = storage.qrange
    if q.size and (q.min() < lo or q.max() > hi):
        raise ArchnetError(
            f"tensor {name!r} holds values in [{q.min()}, {q.max()}], outside "
            f"{storage.name}'s [{lo}, {hi}]"
        )
    q = q.astype(np.int64)
    if storage.bits == 8:
        return numpy_helper.from_array(q.astype(np.int8 if storage.signed else np.uint8), name)
    nibbles = (q.reshape(-1) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)  # first element in the low nibble
    return helper.make_tensor(name, storage.onnx_type, list(q.shape), packed.tobytes(), raw=True)


@dataclass
class Emitted:
    """Nodes and initializers that replace one quantized tensor."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)


def _scale_and_zero_point(
    prefix: str, step: np.ndarray, storage: Storage, out: Emitted, zero: int = 0
) -> tuple[str, str, bool]:
    """Scale and zero-point initializers, and whether they are per channel (several steps)."""
    step = np.asarray(step, np.float32).reshape(-1)
    per_channel = step.size > 1
    scale, zp = f"{prefix}_scale", f"{prefix}_zero_point"
    out.initializers.append(numpy_helper.from_array(step if per_channel else step[0], scale))
    zeros = np.full(step.shape if per_channel else (), zero, np.int64)
    out.initializers.append(integer_tensor(zp, zeros, storage))
    return scale, zp, per_channel


def weight_dq(
    prefix: str,
    q_name: str,
    q: np.ndarray,
    step: np.ndarray,
    axis: int,
    storage: Storage,
    out_name: str,
) -> Emitted:
    """Stored integer weights ``q`` (scale ``step`` per channel along ``axis``) -> DequantizeLinear."""
    emitted = Emitted()
    scale, zp, per_channel = _scale_and_zero_point(prefix, step, storage, emitted)
    emitted.initializers.append(integer_tensor(q_name, q, storage))
    attrs = {"axis": axis} if per_channel else {}
    emitted.nodes.append(
        helper.make_node("DequantizeLinear", [q_name, scale, zp], [out_name], **attrs)
    )
    return emitted


def activation_qdq(
    prefix: str,
    in_name: str,
    out_name: str,
    step: float,
    qrange: tuple[int, int],
    storage: Storage,
) -> Emitted:
    """``in -> [Clip] -> QuantizeLinear -> DequantizeLinear -> out`` with one ``step``.

    ``qrange`` is the quantizer's grid in steps from zero; in unsigned storage a negative
    ``qmin`` becomes the zero point ``-qmin``. The Clip narrows the storage type's range to
    ``qrange`` when that is narrower (a 3-bit activation in a 4-bit or 8-bit type), so the
    graph computes what the quantizer does.
    """
    qmin, qmax = qrange
    zero = 0 if storage.signed else -qmin
    emitted = Emitted()
    scale, zp, _ = _scale_and_zero_point(prefix, np.array([step]), storage, emitted, zero)
    q_in = in_name
    if (qmin + zero, qmax + zero) != storage.qrange:
        lo, hi = f"{prefix}_clip_min", f"{prefix}_clip_max"
        emitted.initializers.append(numpy_helper.from_array(np.float32(qmin * step), lo))
        emitted.initializers.append(numpy_helper.from_array(np.float32(qmax * step), hi))
        q_in = f"{prefix}_clipped"
        emitted.nodes.append(helper.make_node("Clip", [in_name, lo, hi], [q_in]))
    q_out = f"{prefix}_q"
    emitted.nodes.append(helper.make_node("QuantizeLinear", [q_in, scale, zp], [q_out]))
    emitted.nodes.append(helper.make_node("DequantizeLinear", [q_out, scale, zp], [out_name]))
    return emitted
