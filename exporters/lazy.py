"""Weights that stay in the checkpoint until a graph file or a reference run needs them.

A 3B model is 12 GB in float32 and a 7B one 28 GB, so export never holds a model's weights all at once. The
torch model is built from its config with every parameter a placeholder (a zero-strided scalar: no memory)
that knows where its values are in the checkpoint's safetensors files. Then:

- tracing (torch.export, then ONNX) needs shapes only; the traced graph's initializers are bound to their
  checkpoint tensors as lazy tensors (`bind_program`) and read one at a time while the graph file is written
  (weight transposes the exporter would fold are folded per tensor the same way);
- a reference run (verifying a graph against PyTorch) fills each module's parameters just before the module
  runs and empties them right after (`materialized`), so it holds one module's weights at a time;
- a checkpoint stored in float16 or bfloat16 is converted tensor by tensor, never as a whole.

Checkpoint keys are renamed to the model's as transformers renames them when it loads (legacy prefixes, the
base model's prefix); a checkpoint whose weights transformers would convert (fused or split tensors), one
with `pytorch_model.bin` weights, or one where any parameter has no tensor falls back to loading the model
whole (`load` returns None and says why).
"""

from __future__ import annotations

import json
import logging
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

ATTR = "_mmedge_source"  # a placeholder parameter's Source
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    with Path(path).open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


@dataclass(frozen=True)
class Source:
    """One tensor of a safetensors file, read on demand as float32 (or its own integer type)."""

    file: Path
    key: str
    dtype: str  # safetensors' name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    def array(self, axes: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor as float32 (integers as stored), its axes permuted by `axes` (contiguous) when given."""
        raw = np.fromfile(self.file, dtype=_DTYPES[self.dtype], count=int(np.prod(self.shape, dtype=np.int64)),
                          offset=self.begin).reshape(self.shape)
        if self.dtype in ("BF16", "F16", "F64"):
            # converted (and transposed) by torch in one multi-threaded pass: a [11008, 2048] bfloat16 weight in
            # 0.02 s, 0.1 s transposed, where numpy's shift took 0.29 s and torch's transpose after it 0.07 more
            # (2 cores)
            stored = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16) if self.dtype == "BF16" \
                else torch.from_numpy(raw)
            if axes is not None:
                stored = stored.permute(*axes)
            return torch.empty(tuple(stored.shape), dtype=torch.float32).copy_(stored).numpy()
        return raw if axes is None else transposed(raw, axes)

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.array())

    def identity(self) -> str:
        """What the tensor's bytes are known by without reading them (for the trace cache's key)."""
        stat = self.file.stat()
        return f"{self.file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.key}|{self.dtype}"


def checkpoint_tensors(checkpoint: Path) -> dict[str, Source] | None:
    """Every tensor of the checkpoint's safetensors files by its stored name; None if it has none."""
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        return None
    out = {}
    for path in files:
        header, start = read_header(path)
        for key, info in header.items():
            begin, end = info["data_offsets"]
            out[key] = Source(path, key, info["dtype"], tuple(info["shape"]), start + begin, start + end)
    return out


def source_of(tensor) -> Source | None:
    return getattr(tensor, ATTR, None)


def value(tensor) -> torch.Tensor:
    """A parameter's values: read from the checkpoint when it is a placeholder, else the tensor itself (for
    the numbers a family writes into the manifest, e.g. CLIP's logit scale)."""
    source = source_of(tensor)
    return source.tensor() if source is not None else tensor.detach()


def placeholder(source: Source, shape) -> torch.nn.Parameter:
    """A parameter of `shape` that takes no memory and knows its source."""
    param = torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(tuple(shape)), requires_grad=False)
    setattr(param, ATTR, source)
    return param


def load(checkpoint: Path):
    """The checkpoint's model with placeholder parameters (buffers real), or None where it must be loaded whole."""
    import transformers
    from transformers import AutoConfig

    tensors = checkpoint_tensors(checkpoint)
    if tensors is None:
        log.info("loading the model whole: its weights are not in safetensors files")
        return None
    config = AutoConfig.from_pretrained(checkpoint)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        log.info("loading the model whole: its class %r is not in transformers", arch)
        return None
    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    sources = _model_sources(model, tensors)
    if isinstance(sources, str):
        log.info("loading the model whole: %s", sources)
        return None
    try:
        _fill(model, sources)
    except LazyLoadError as exc:
        log.info("loading the model whole: %s", exc)
        return None
    if (Path(checkpoint) / "generation_config.json").exists():  # as from_pretrained reads it (EOS ids, forced BOS)
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    return model


def _model_sources(model, tensors: dict[str, Source]) -> dict[str, Source] | str:
    """Model state key -> its checkpoint tensor, renamed as transformers renames at load; or why not."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    state = model.state_dict()
    out = {}
    for key, source in tensors.items():
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            return f"transformers converts its tensor {key!r} ({converted}) as it loads"
        out[name] = source
    return out


def _fill(model, sources: dict[str, Source]) -> None:
    """Placeholders for the parameters (tied ones stay one object), real tensors for the buffers."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    made: dict[int, torch.nn.Parameter] = {}
    missing = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                found = next((sources[n] for n in by_id[id(param)] if n in sources), None)
                if found is None or tuple(found.shape) != tuple(param.shape):
                    missing.append(f"{module_name}.{attr}".lstrip("."))
                    continue
                made[id(param)] = placeholder(found, param.shape)
            module._parameters[attr] = made[id(param)]
    if missing:
        raise LazyLoadError(f"{len(missing)} parameters have no tensor in the checkpoint (first: {missing[0]})")
    # buffers: persistent ones from the checkpoint; the others (rotary frequencies, position ids) computed as
    # transformers computes them after loading onto the meta device, by the model's own weight init (which skips
    # everything marked initialized: every parameter here)
    for key, buf in list(model.named_buffers()):
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        module._buffers[attr] = (sources[key].tensor().to(buf.dtype) if key in sources
                                 else torch.empty_like(buf, device="cpu"))
    for key, buf in model.named_buffers():
        buf._is_hf_initialized = key in sources
    for param in model.parameters():
        param._is_hf_initialized = True
    model.initialize_weights()


class LazyLoadError(Exception):
    pass


def is_lazy(module: torch.nn.Module) -> bool:
    return any(source_of(p) is not None for p in module.parameters())


# modules that read their children's weights without calling them: filled whole when they run (torch's
# MultiheadAttention takes out_proj.weight into F.multi_head_attention_forward: SigLIP's pooling head)
READS_CHILDREN = (torch.nn.MultiheadAttention,)


@contextmanager
def materialized(module: torch.nn.Module):
    """Run `module` with real weights: each submodule's own parameters are read just before it runs and dropped
    right after (tied ones read per module), so a reference run holds one module's weights at a time. A module
    that reads a child's weights without calling the child (other than READS_CHILDREN) would see zeros: its outputs then differ from the
    exported graph's, and verification says so."""
    handles = []

    def own(mod):  # the modules whose parameters `mod` reads when it runs
        return list(mod.modules()) if isinstance(mod, READS_CHILDREN) else [mod]

    def fill(mod, args):
        for m in own(mod):
            m._mmedge_lazy = dict(m._parameters)
            for name, param in m._parameters.items():
                if source_of(param) is not None:
                    m._parameters[name] = torch.nn.Parameter(source_of(param).tensor(), requires_grad=False)

    def empty(mod, args, output):
        for m in own(mod):
            m._parameters.update(m.__dict__.pop("_mmedge_lazy", {}))

    for mod in module.modules() if isinstance(module, torch.nn.Module) else ():  # (or a plain function)
        if isinstance(mod, READS_CHILDREN) or any(source_of(p) is not None for p in mod._parameters.values()):
            handles.append(mod.register_forward_pre_hook(fill))
            handles.append(mod.register_forward_hook(empty, always_call=True))
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()


def bind_program(program, module: torch.nn.Module) -> int:
    """Give a traced program's placeholder initializers their checkpoint tensors, as lazy tensors read when the
    graph is written; a Transpose of one (a linear layer's weight) becomes a lazy transposed initializer, as the
    exporter's optimizer would fold it, so no weight is ever folded in memory. Returns how many were bound;
    raises if any placeholder is left (its zeros must never reach a graph file)."""
    import onnx_ir as ir

    graph = program.model.graph
    names = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]:
        if source_of(tensor) is not None:
            names[name] = source_of(tensor)
    bound = 0
    for name, value in list(graph.initializers.items()):
        raw = getattr(value.const_value, "raw", None)
        source = names.get(name) or source_of(raw)
        if source is None:
            continue
        value.const_value = _lazy(source)
        bound += 1
        uses = value.uses()
        if len(uses) != 1 or uses[0].node.op_type != "Transpose" or value.is_graph_output():
            continue
        node = uses[0].node
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else ()
        folded = ir.Value(name=out.name, type=ir.TensorType(ir.DataType.FLOAT), const_value=_lazy(source, perm))
        folded.shape = ir.Shape(list(folded.const_value.shape))
        ir.convenience.replace_all_uses_with(out, folded)
        graph.remove(node, safe=True)
        graph.initializers.pop(name)
        graph.register_initializer(folded)
    left = [n for n, v in graph.initializers.items()
            if source_of(getattr(v.const_value, "raw", None)) is not None]
    if left:
        raise RuntimeError(f"{len(left)} traced weights have no checkpoint tensor (first: {left[0]})")
    return bound


def _lazy(source: Source, perm: tuple[int, ...] | None = None):
    """A lazy onnx_ir tensor of `source`, transposed by `perm` when given (() reverses the axes)."""
    import onnx_ir as ir

    axes = None if perm is None else (perm or tuple(reversed(range(len(source.shape)))))

    def value():
        return ir.tensor(source.array(axes))

    dims = source.shape if axes is None else tuple(source.shape[i] for i in axes)
    return ir.LazyTensor(value, dtype=ir.DataType.FLOAT, shape=ir.Shape(list(dims)))


def transposed(array: np.ndarray, axes=None, out: np.ndarray | None = None) -> np.ndarray:
    """`array.transpose(axes)` made contiguous (into `out` if given), by torch's blocked copy: twice numpy's
    speed on a [11008, 2048] float32 weight (0.09 against 0.17 s, 2 cores)."""
    moved = torch.from_numpy(array).permute(*(axes if axes is not None else reversed(range(array.ndim))))
    if out is None:
        return moved.contiguous().numpy()
    torch.from_numpy(out).copy_(moved)
    return out


def values(tensor: torch.Tensor) -> np.ndarray:
    """A parameter's values as float32: read from the checkpoint where it is a placeholder."""
    source = source_of(tensor)
    return source.array() if source is not None else tensor.detach().float().numpy()


ALIGN = 4096  # external tensors start on a page, so ONNX Runtime can map them instead of copying


def write_model(model, deferred: dict, path: Path, external: bool) -> None:
    """Write an ONNX `model` whose initializers named in `deferred` are empty, each function giving its array:
    inline (a small graph) or, with `external`, every initializer over 1 KB into `<file>.data` one at a time,
    so no more than one weight is in memory while a big graph is written."""
    import onnx
    from onnx import TensorProto, numpy_helper

    path = Path(path)
    if not external:
        for init in model.graph.initializer:
            if init.name in deferred:
                tensor = numpy_helper.from_array(deferred[init.name](), init.name)
                if init.data_type and tensor.data_type != init.data_type:  # a packed type's bytes (INT4 as uint8)
                    init.raw_data = tensor.raw_data
                else:
                    init.CopyFrom(tensor)
        onnx.save_model(model, str(path))
        return
    location = path.name + ".data"
    with (path.parent / location).open("wb") as f:
        for init in model.graph.initializer:
            if init.name in deferred:
                raw = np.ascontiguousarray(deferred[init.name]()).tobytes()
            elif init.data_location != TensorProto.EXTERNAL and init.ByteSize() > 1024:
                raw = numpy_helper.to_array(init).tobytes()
            else:
                continue
            f.write(b"\0" * (-f.tell() % ALIGN))
            offset = f.tell()
            f.write(raw)
            for field in ("raw_data", "float_data", "int64_data", "int32_data", "double_data"):
                init.ClearField(field)
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            del raw
    onnx.save_model(model, str(path))
