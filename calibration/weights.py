"""An ONNX graph's weights read one at a time, and weight-only MatMulNBits written one at a time.

A 3B decoder is 10 GB of float32 weights in `decoder.onnx.data`. Loading it whole with onnx.load, scaling it
for AWQ and handing it to onnxruntime's MatMulNBitsQuantizer held it two to three times over (the kernel
killed such an export on a 24 GB machine). Here the graph is read without its weights (`GraphWeights`), each
weight is read from the data file when it is needed (AWQ's search, then its quantization), the scales AWQ puts
on a weight are kept as factors applied as it is read, and the quantized graph is written tensor by tensor
(lazy.write_model). The packing is onnxruntime's own (`quantize_matmul_4bits` / `_8bits`, the kernels
MatMulNBitsQuantizer calls), over column slices of each weight, so the graph is the one MatMulNBitsQuantizer
would write, with no weight ever held more than once. A graph goes to float16 the same way (`to_float16`): the
converter sees every big weight's type and shape, not its values, and each is halved as it is written.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mmedge.exporters import lazy

COLUMNS = 8192  # weight columns quantized per kernel call: a 257k-token LM head is never copied whole


class GraphWeights:
    """The graph at `path` without its weights; `array(name)` reads one initializer (with the factors recorded
    by `scale`), from the graph or its external data file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.model = onnx.load(str(path), load_external_data=False)
        self.inits = {i.name: i for i in self.model.graph.initializer}
        self.factors: dict[str, list[np.ndarray]] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.inits[name].dims)

    def _base(self, name: str) -> np.ndarray:
        init = self.inits[name]
        if init.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(init)
        file, offset = self._external(init)
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        count = int(np.prod(init.dims, dtype=np.int64))
        return np.fromfile(file, dtype=dtype, count=count, offset=offset).reshape(init.dims)

    def mapped(self, name: str) -> np.ndarray:
        """Initializer `name` as stored (no factors), memory-mapped where it is in a data file: read as sliced."""
        init = self.inits[name]
        if init.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(init)
        file, offset = self._external(init)
        return np.memmap(file, dtype=helper.tensor_dtype_to_np_dtype(init.data_type), mode="r", offset=offset,
                         shape=tuple(init.dims))

    def _external(self, init) -> tuple[Path, int]:
        info = {e.key: e.value for e in init.external_data}
        file = (self.path.parent / info["location"]).resolve()
        if not file.is_relative_to(self.path.parent.resolve()):
            raise ValueError(f"{init.name}'s data file {info['location']!r} is outside {self.path.parent}")
        return file, int(info.get("offset", 0))

    def array(self, name: str) -> np.ndarray:
        array = self._base(name)
        for factor in self.factors.get(name, ()):  # in the order recorded (a row scale, then a column one)
            array = array * factor
        return array

    def scale(self, name: str, factor: np.ndarray) -> None:
        """Multiply initializer `name` by `factor` (broadcast), applied whenever it is read from now on (kept as
        given: a [K, 1] and a [1, N] factor are two vectors, not a [K, N] product)."""
        self.factors.setdefault(name, []).append(factor)

    def add(self, array: np.ndarray, name: str) -> None:
        """A new small initializer, inline."""
        init = numpy_helper.from_array(array, name)
        self.model.graph.initializer.append(init)
        self.inits[name] = self.model.graph.initializer[-1]

    def write(self, path: Path, deferred: dict | None = None, external: bool = True) -> None:
        """Write the graph to `path`: every weight read (or produced by `deferred`) one at a time."""
        deferred = dict(deferred or {})
        used = {name for node in self.model.graph.node for name in node.input}
        kept = [i for i in self.model.graph.initializer if i.name in used or i.name in deferred]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)
        for init in self.model.graph.initializer:
            if init.name not in deferred and (init.data_location == TensorProto.EXTERNAL or init.name in self.factors):
                deferred[init.name] = lambda name=init.name: self.array(name)
        lazy.write_model(self.model, deferred, Path(path), external)


def quantize_columns(w_columns, k: int, n: int, bits: int, block: int):
    """Block-wise symmetric quantization of a [K, N] weight given as `w_columns(start, stop)` (a float32 [K, m]
    slice): (packed uint8 [N, K/block, block*bits/8], scales float32 [N, K/block]), as MatMulNBits stores them."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    k_blocks = (k + block - 1) // block
    blob = block * bits // 8
    packed = np.zeros((n, k_blocks, blob), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, (k_blocks + 8 // bits - 1) // (8 // bits)), dtype=np.uint8)  # unused (symmetric)
    for start in range(0, n, COLUMNS):
        stop = min(n, start + COLUMNS)
        w = np.ascontiguousarray(w_columns(start, stop), dtype=np.float32)
        # rows [start, stop) of packed / scales are contiguous: the kernel writes them in place
        kernel(packed[start:stop], w, scales[start:stop], zero_points[: stop - start], block, stop - start, k, True)
    return packed, scales


class Pairs:
    """Deferred tensors made two at a time from one weight (its quantized values and their scales): the pair last
    made is kept until the next is asked for, so a weight is read and quantized once and one pair is held."""

    def __init__(self):
        self._key, self._pair = None, None

    def deferred(self, key, make) -> tuple:
        """(values, scales) as deferred functions over `make()` -> (values, scales)."""
        def part(i):
            if self._key != key:
                self._key, self._pair = None, None  # let the last pair go before making the next
                self._pair, self._key = make(), key
            return self._pair[i]

        return (lambda: part(0)), (lambda: part(1))


def to_matmul_nbits(weights: GraphWeights, nodes: list, bits: int, block, accuracy_level: int) -> dict:
    """Replace each MatMul of `nodes` (weight [K, N] in `weights`) by MatMulNBits of `bits` in blocks of `block`
    (or of `block(K)`); returns the deferred initializers (name -> function) that GraphWeights.write computes one
    at a time."""
    graph = weights.model.graph
    deferred = {}
    pairs = Pairs()
    replaced: dict[str, onnx.NodeProto] = {}  # by the MatMul's output (unique in the graph): its MatMulNBits
    for node in nodes:
        name = node.input[1]
        k, n = weights.shape(name)
        packed_name, scales_name = f"{name}_Q{bits}", f"{name}_scales"
        blk = block(k) if callable(block) else block

        def quantized(name=name, k=k, n=n, blk=blk):
            base = weights.array(name)  # one weight, AWQ factors applied
            return quantize_columns(lambda a, b: base[:, a:b], k, n, bits, blk)

        k_blocks = (k + blk - 1) // blk
        graph.initializer.append(TensorProto(name=packed_name, data_type=TensorProto.UINT8,
                                             dims=[n, k_blocks, blk * bits // 8]))
        graph.initializer.append(TensorProto(name=scales_name, data_type=TensorProto.FLOAT, dims=[n, k_blocks]))
        deferred[packed_name], deferred[scales_name] = pairs.deferred(name, quantized)
        attrs = dict(K=k, N=n, bits=bits, block_size=blk)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        quantized = helper.make_node("MatMulNBits", [node.input[0], packed_name, scales_name], list(node.output),
                                     name=(node.name + f"_Q{bits}") if node.name else "", domain="com.microsoft",
                                     **attrs)
        replaced[node.output[0]] = quantized
    if replaced:  # one pass over the graph (a search per node was quadratic in a big decoder's nodes)
        kept = [replaced.get(n.output[0], n) if n.op_type == "MatMul" and n.output else n for n in graph.node]
        del graph.node[:]
        graph.node.extend(kept)
    return deferred


# float16's limits as onnxruntime's converter applies them (convert_np_to_float16's defaults)
FP16_MIN_POSITIVE, FP16_MAX_FINITE = 5.96e-08, 65504.0
HALF_CHUNK = 1 << 22  # values halved per step: a 2 GB embedding table is never copied whole


def half(array: np.ndarray) -> np.ndarray:
    """`array` in float16 as onnxruntime's convert_np_to_float16 makes it (magnitudes under the smallest subnormal
    raised to it, finite ones past float16's range clipped to its largest, sign, zero, inf and NaN kept), a chunk
    at a time: that function's masks and copies hold a big weight four times over."""
    flat = np.ascontiguousarray(array).reshape(-1)
    out = np.empty(flat.shape, dtype=np.float16)
    for start in range(0, flat.size, HALF_CHUNK):
        x = np.array(flat[start:start + HALF_CHUNK], dtype=np.float32)
        tiny = (np.abs(x) < FP16_MIN_POSITIVE) & (x != 0)
        x[tiny] = np.copysign(FP16_MIN_POSITIVE, x[tiny])
        big = (np.abs(x) > FP16_MAX_FINITE) & np.isfinite(x)
        x[big] = np.copysign(FP16_MAX_FINITE, x[big])
        out[start:start + HALF_CHUNK] = x
    return out.reshape(np.shape(array))


_PATCHING = threading.Lock()  # the converter's module is patched: one conversion at a time in a process


@contextmanager
def _value_info_from_dims():
    """onnxruntime's converter reads an initializer's values to learn its shape (make_value_info_from_tensor);
    the dims say the same without the values, which a streamed graph does not hold. Held under a lock: another
    thread converting meanwhile would see (and might restore) the patch."""
    from onnxruntime.transformers import float16

    with _PATCHING:
        original = float16.make_value_info_from_tensor
        float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type,
                                                                                        list(t.dims))
        try:
            yield
        finally:
            float16.make_value_info_from_tensor = original


def to_float16(weights: GraphWeights, deferred: dict | None = None, **convert) -> dict:
    """onnxruntime's convert_float_to_float16 (`convert`: its options) on `weights.model` without reading a weight:
    each initializer held outside the graph (in a data file, with factors, or in `deferred`) is shown to the
    converter as its type and shape only, and comes back as a deferred function (halved as it is written where
    the converter made it float16). Returns every deferred initializer for GraphWeights.write."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    sources = dict(deferred or {})
    for init in weights.model.graph.initializer:
        if init.name in sources:
            continue
        if init.data_location == TensorProto.EXTERNAL or init.name in weights.factors:
            kept = TensorProto()
            kept.CopyFrom(init)  # read from here from now on: the graph's own becomes a shape
            weights.inits[init.name] = kept
            sources[init.name] = lambda name=init.name: weights.array(name)
        else:
            continue
        for field in ("raw_data", "float_data"):
            init.ClearField(field)
        init.data_location = TensorProto.DEFAULT
        del init.external_data[:]
    with _value_info_from_dims():
        weights.model = convert_float_to_float16(weights.model, **convert)
    out = {}
    for init in weights.model.graph.initializer:
        source = sources.get(init.name)
        if source is not None and init.data_type == TensorProto.FLOAT16:
            out[init.name] = lambda source=source: half(source())
        elif source is not None:
            out[init.name] = source
    return out
