"""Traced ONNX graphs kept between exports, so one model exported for several targets or precisions is traced once.

Tracing (torch.export, then ONNX) is most of an export's time: minutes per graph for a 3B decoder. The
onnxruntime, openvino and tensorrt targets all start from the same traced graph of a part, and a quantized
export starts from the fp32 one, so with a cache directory (`mmedge export --trace-cache DIR`, or the
MMEDGE_TRACE_CACHE environment variable) each distinct graph is traced once and read back afterwards. Every
export still verifies the graph it writes against PyTorch.

A graph is found again only if everything its trace depends on is the same: the module's code (class and
every scalar setting of every submodule, the model config included), every parameter and buffer byte for
byte (a weight still in the checkpoint by its file's path, size and modification time, and its name), the
trace inputs, names and dynamic axes, mmedge's exporter sources, and the versions of torch, onnxscript, onnx
and transformers. Entries are written atomically (a temporary folder, then a rename), so a killed export
never leaves a half-written one; a damaged entry is traced again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import onnx
import torch

from mmedge.errors import first_line
from mmedge.exporters import lazy

log = logging.getLogger(__name__)

ENV = "MMEDGE_TRACE_CACHE"
LIST = "files.txt"  # an entry's files, written last: an entry without it is incomplete
_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"}


def directory(explicit: str | os.PathLike | None = None) -> Path | None:
    """The cache directory: `explicit`, else $MMEDGE_TRACE_CACHE, else None (no cache)."""
    chosen = explicit or os.environ.get(ENV)
    return Path(chosen).expanduser() if chosen else None


def cached_trace(job, trace: Callable[[Path], None], dest: Path, cache: Path | None) -> None:
    """Write the graph of `job` to `dest` (with `dest`.data where its weights are external) by trace(dest), or
    copy it from `cache` when this exact graph was traced before."""
    if cache is None:
        trace(dest)
        return
    key = job._trace_key = job_key(job)  # kept for what is converted from this trace (`converted`)
    entry = hashlib.sha256(f"{key}|{dest.name}".encode()).hexdigest()[:32]

    def readable(folder: Path) -> None:
        onnx.load(str(folder / dest.name), load_external_data=False)

    if _kept(cache, entry, trace, dest, "traced graph", readable):
        log.info("%s: traced graph read from %s", job.name, cache / entry)
    else:
        log.info("%s: traced graph kept in %s", job.name, cache / entry)


def converted(job, kind: str, produce: Callable[[Path], None], dest: Path) -> None:
    """Write `dest` with produce(dest), or copy it from the cache: what a target converts a traced graph into
    (OpenVINO's IR, .xml and .bin; a Core ML .mlpackage) depends on nothing but the trace and `kind` (the
    converter, its version and settings), so it is kept under the trace's key."""
    cache = job.trace_cache
    if cache is None:
        produce(dest)
        return
    trace = getattr(job, "_trace_key", None) or job_key(job)
    entry = hashlib.sha256(f"{trace}|{kind}|{dest.name}".encode()).hexdigest()[:32]
    what = kind.split("|")[0]
    if _kept(cache, entry, produce, dest, what):
        log.info("%s: %s read from %s", job.name, what, cache / entry)
    else:
        log.info("%s: %s kept in %s", job.name, what, cache / entry)


def _kept(cache: Path, name: str, produce: Callable[[Path], None], dest: Path, what: str,
          check: Callable[[Path], None] | None = None) -> bool:
    """Copy the files of entry `name` beside `dest` (True), or produce(dest) and keep every file it writes
    beside `dest` as that entry (False). Entries are written atomically; an unreadable one is made again."""
    entry = cache / name
    try:
        names = (entry / LIST).read_text().split()
    except OSError:
        names = []
    if names and all((entry / n).exists() for n in names):
        try:
            if check:
                check(entry)
            for n in names:
                _copy(entry / n, dest.parent / n)
            return True
        except Exception as exc:  # a damaged entry: make it again and replace it
            log.warning("cached %s %s unreadable (%s); making it again", what, entry, first_line(exc))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))
    except OSError as exc:  # a full or read-only cache never fails the export
        log.warning("could not keep the %s in %s: %s", what, cache, exc)
        produce(dest)
        return False
    try:
        produce(tmp / dest.name)
        names = sorted(p.name for p in tmp.iterdir())
        for n in names:
            _copy(tmp / n, dest.parent / n)
        (tmp / LIST).write_text("\n".join(names))
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError as exc:
        log.warning("could not keep the %s in %s: %s", what, cache, exc)
        if not dest.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return False


def _copy(src: Path, dst: Path) -> None:
    """A file, or a folder (a Core ML .mlpackage) whole."""
    if src.is_dir():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


def job_key(job) -> str:
    """A digest of everything the traced graph of `job` depends on."""
    h = hashlib.sha256()
    h.update(_environment().encode())
    for part in (job.name, job.input_names, job.output_names, job.dynamic_axes, job.output_axes, job.kv_storage,
                 job.trace_whole):
        h.update(repr(part).encode())
    _hash_value(h, job.trace_inputs)
    _hash_module(h, job.module)
    return h.hexdigest()[:32]


@lru_cache(maxsize=1)
def _environment() -> str:
    """Library versions and mmedge's exporter sources (the wrappers and families that shape the trace)."""
    versions = []
    for dist in ("torch", "onnxscript", "onnx", "transformers"):
        try:
            versions.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist}=none")
    sources = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        sources.update(path.name.encode() + path.read_bytes())
    return ";".join(versions) + ";" + sources.hexdigest()


def _hash_module(h, module: torch.nn.Module) -> None:
    for name, sub in module.named_modules(remove_duplicate=False):
        h.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}".encode())
        for attr, value in sorted(vars(sub).items()):
            if attr not in _MODULE_INTERNALS and not attr.startswith("_forward") and not attr.endswith("_hooks"):
                h.update(attr.encode())
                _hash_value(h, value)
    for name, tensor in [*module.state_dict(keep_vars=True).items(), *_non_persistent(module)]:
        h.update(name.encode())
        _hash_value(h, tensor)


def _non_persistent(module: torch.nn.Module):
    """Buffers state_dict leaves out (rotary inverse frequencies, position ids): they shape the graph too."""
    for prefix, sub in module.named_modules():
        for name in sorted(getattr(sub, "_non_persistent_buffers_set", ())):
            if sub._buffers.get(name) is not None:
                yield f"{prefix}.{name}", sub._buffers[name]


def _hash_value(h, value, depth: int = 0) -> None:
    if isinstance(value, torch.Tensor) and lazy.source_of(value) is not None:  # still in the checkpoint file
        h.update(f"S{tuple(value.shape)}{lazy.source_of(value).identity()}".encode())
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, (str, int, float, bool, type(None), torch.dtype, torch.device)):
        h.update(f"{type(value).__name__}:{value!r}".encode())
    elif depth > 4:
        h.update(type(value).__qualname__.encode())
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for item in value:
            _hash_value(h, item, depth + 1)
    elif isinstance(value, dict):
        h.update(f"{{{len(value)}".encode())
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _hash_value(h, value[k], depth + 1)
    elif hasattr(value, "to_json_string"):  # a transformers config, with the attention implementation it picked
        h.update(value.to_json_string(use_diff=False).encode())
        h.update(repr(getattr(value, "_attn_implementation", None)).encode())
    elif isinstance(value, torch.nn.Module):
        h.update(type(value).__qualname__.encode())  # its own settings and weights are hashed as a submodule
    elif isinstance(value, functools.partial):
        _hash_value(h, (value.func, value.args, value.keywords), depth + 1)
    elif callable(value):
        h.update(f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
                 .encode())
        closure = getattr(value, "__closure__", None) or ()
        for cell in closure:
            try:
                _hash_value(h, cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass
    else:
        h.update(type(value).__qualname__.encode())
        if hasattr(value, "__dict__"):
            _hash_value(h, {k: v for k, v in vars(value).items() if not k.startswith("__")}, depth + 1)
