"""Export big models to every target and precision, and record what it costs: wall time, peak memory of the
whole process tree, package size (docs/scale.md).

    python tools/scale.py --models paligemma-3b-shaped --targets onnxruntime --quants fp32 int4

Each export runs as its own `mmedge export` process (nothing else should run meanwhile); the process tree's
resident memory is sampled every 0.2 s and two peaks kept: all of it (memory-mapped weight files included) and
its anonymous part (resident pages no file backs), each page shared between processes counted once (Linux's
proportional Pss; a child forked from a 10 GB export is not another 10 GB). Results accumulate in
docs/scale.json, one entry per (model, target, quant), so runs can be made a few at a time; docs/scale.md is
written from all of them after each export. With --bench, each int4 package is then run with `mmedge bench`
too. Beside each export's log in --work, NAME.timeline has the memory every 2 s (the highest of the samples
since the line before) with the log's last line at that moment: where in the export the peak is.

With --memory-limit GIB (Linux, root: a cgroup's memory controller, v2 or v1), each export runs in a cgroup that
holds it to that much memory, the page cache its reads fill included, as a machine of that size would: the kernel
takes clean pages of mapped weight files back when the export needs more (they are read again when touched), and
kills the export if the memory it cannot give back goes over. Such a row is kept beside the unlimited one; its
result gives the cgroup's own peak (page cache included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("paligemma-3b-shaped", "qwen2.5-vl-3b-shaped", "llava-1.5-7b-shaped")
TARGETS = ("onnxruntime", "openvino", "tensorrt", "coreml")
QUANTS = ("fp32", "fp16", "int8", "int4")


def resident(proc: psutil.Process, shared: bool) -> tuple[int, int]:
    """(resident bytes, the anonymous part) of one process: RSS, and RSS less its file-backed pages. `shared`
    (the tree has more than one process), on Linux, the proportional counts instead (Pss, Pss_Anon of
    /proc/PID/smaps_rollup): a page two processes share counts half in each, so a child forked from a big export
    (copy-on-write: all of its parent's pages resident in both until it execs) does not count the parent twice.
    Reading smaps_rollup walks every mapping (~70 ms for an export with its weights mapped), so only then."""
    if not shared:
        info = proc.memory_info()
        return info.rss, info.rss - getattr(info, "shared", 0)
    try:
        rollup = Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines()[1:]  # the first names the range
        fields = dict(line.split(":", 1) for line in rollup)
        return int(fields["Pss"].split()[0]) * 1024, int(fields["Pss_Anon"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return resident(proc, shared=False)


class PeakRSS:
    """The highest sum of resident memory over a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2, timeline: Path | None = None, log: Path | None = None):
        self.root, self.every, self.peak, self.peak_anon = psutil.Process(pid), every, 0, 0
        # every 2 s, a line of the timeline: seconds, RSS and anonymous GiB, and the export's last log line
        self.timeline, self.log, self._next, self._window = timeline, log, 0.0, (0, 0)
        self._started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = anon = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                for proc in procs:
                    try:
                        rss, own = resident(proc, shared=len(procs) > 1)
                        total, anon = total + rss, anon + own
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
            self._record(total, anon)
            self._stop.wait(self.every)

    def _record(self, total: int, anon: int) -> None:
        elapsed = time.perf_counter() - self._started
        self._window = (max(self._window[0], total), max(self._window[1], anon))  # the highest since the last line
        if self.timeline is None or elapsed < self._next:
            return
        self._next = elapsed + 2.0
        (total, anon), self._window = self._window, (0, 0)
        last = ""
        if self.log is not None and self.log.exists():
            with self.log.open("rb") as f:  # the tail only: a progress bar rewrites its line with \r
                f.seek(max(0, f.seek(0, 2) - 400))
                tail = f.read().decode(errors="replace").replace("\r", "\n").strip().splitlines()
                last = tail[-1][-120:] if tail else ""
        with self.timeline.open("a") as out:
            out.write(f"{elapsed:8.1f} s  rss {total / 2**30:6.2f}  anon {anon / 2**30:6.2f} GiB  {last}\n")

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak, self.peak_anon


class MemoryCage:
    """A cgroup holding a process tree to `limit` bytes of memory (page cache included): cgroup v2 where the memory
    controller is there, else v1. Raises SystemExit with one line where neither can be made (not Linux, not
    root, no memory controller)."""

    def __init__(self, limit: int):
        roots = [Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")]
        v2 = next((r for r in roots if "memory" in _read(r / "cgroup.controllers").split()), None)
        self.v2 = v2 is not None
        parent = v2 if v2 is not None else Path("/sys/fs/cgroup/memory")
        self.path = parent / f"mmedge-scale-{os.getpid()}"
        try:
            self.path.mkdir()
            (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
            if self.v2 and (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")  # held in memory, not pushed to swap
        except OSError as e:
            self.path.rmdir() if self.path.exists() else None
            raise SystemExit(f"scale.py: --memory-limit needs a cgroup memory controller it may write to "
                             f"({self.path}: {e.strerror}); run as root on Linux, or leave the limit out")

    @staticmethod
    def drop_page_cache() -> None:
        """Empties the page cache (before a run): a page already cached stays charged to the cgroup that read it
        first, so the weights an earlier run left cached would be the export's for free, not held to its limit."""
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1")
        except OSError as e:
            raise SystemExit(f"scale.py: --memory-limit empties the page cache first and could not "
                             f"(/proc/sys/vm/drop_caches: {e.strerror}); run as root") from None

    def enter(self) -> None:
        """Moves the calling process into the cgroup (a child's preexec_fn: before it execs the export)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        return int(_read(self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")) or 0)

    def oom_kills(self) -> int:
        fields = dict(line.split() for line in _read(self.path / ("memory.events" if self.v2 else
                                                                   "memory.oom_control")).splitlines())
        return int(fields.get("oom_kill", 0))

    def close(self) -> None:
        self.path.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def mmedge(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "mmedge"), *args]


def measure(command: list[str], log: Path, cage: MemoryCage | None = None) -> dict:
    started = time.perf_counter()
    log.with_suffix(".timeline").unlink(missing_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=cage.enter if cage else None)
        rss = PeakRSS(proc.pid, timeline=log.with_suffix(".timeline"), log=log)
        code = proc.wait()
    peak, anon = rss.stop()
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    held = {} if cage is None else {"cgroup_peak_gb": round(cage.peak() / 2**30, 2), "oom_kills": cage.oom_kills()}
    return {**held, "exit": code, "wall_s": round(time.perf_counter() - started, 1), "peak_rss_gb": round(peak / 2**30, 2),
            "peak_anon_gb": round(anon / 2**30, 2),
            "last_line": _last_line(lines)}


def _last_line(lines: list[str]) -> str:
    """What the export said last: a refusal (one line, exit 2) whole, from its start; anything else its last 300
    characters (a traceback's or a progress bar's end)."""
    if not lines:
        return ""
    if lines[-1].startswith("mmedge: error: "):
        return "refused: " + lines[-1][len("mmedge: error: "):]
    return lines[-1][-300:]


def cpu_name() -> str:
    """' (the CPU's model name, its widest vector extension)' from /proc/cpuinfo; empty where there is none."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)}
    name, flags = fields.get("model name", ""), fields.get("flags", "").split()
    vector = next((f for f in ("avx512_vnni", "avx512f", "avx2") if f in flags), "")
    return f" ({', '.join(x for x in (name, vector) if x)})" if name or vector else ""


def size_gb(path: Path) -> float | None:
    if not path.exists():
        return None
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30, 2)


HOW = """
## How export keeps within memory

- **Weights stay in the checkpoint** (exporters/lazy.py). The torch model is built from its config with every
  parameter a placeholder that takes no memory and knows its tensor in the safetensors files (names renamed as
  transformers renames them at load; float16 and bfloat16 converted tensor by tensor). Tracing needs shapes
  only. The traced graph's weights are bound to their tensors and read one at a time as the graph file is
  written, weight transposes included (a float16/bfloat16 tensor widened and transposed by torch in one pass);
  the fused ONNX Runtime decoder's weights likewise. A decoder whose layers are alike is traced through its
  first three layers and the rest repeated in the graph (exporters/repeat_layers.py): Qwen2.5-VL-3B's 36-layer
  decoder graph is written in ~79 s (torch.export 16 s, where it took ~2.5 s a layer; ONNX's optimizer 13 s;
  reading, widening and writing its 12.3 GB of weights 48 s).
- **Verification** runs PyTorch first, each module's weights read just before it runs and dropped after,
  then the engine on the written graph with its weights memory-mapped (ONNX Runtime without prepacking, which
  would copy them): the two are never held at once. The fused decoder's checks give it 32-slot cache buffers,
  not max_context ones (at LLaVA-1.5-7B's 32 layers x 32 heads, full-length buffers took 7.8 GiB for the check
  inputs and as much again for the references: 17.5 GiB anonymous at the peak, 2026-12-04). A decoder over 1 GiB
  is checked a few layers at a time (below).
- **A big float32 decoder runs by layer groups** (calibration/layered.py) wherever nothing depends on its answers:
  calibration's prefills, the held-out measurement's fp32 side and the export's check against PyTorch. Its
  ONNX graph is cut into
  pieces of about 1 GiB of weights (its own nodes in their order, each piece a small graph file reading the
  decoder's data file, cut where the fewest tensors cross: the residual stream at a layer's edge). The samples
  run through the real pipeline with the decoder deferred (each call's inputs kept, zeros answered), then every
  sample's steps run through the first piece, each over its own cache slots as the package holds them, the tensors
  crossing kept per step, then the second piece, and so on, each piece's session let go before the next opens: one
  piece's weights mapped at a time, each weight read once for all the samples rather than once per sample. The
  measurement therefore runs the quantized package first (its greedy answers and their logits) and forces the
  fp32 decoder along those answers (docs/quantization.md). Outputs are the whole graph's up to float32 rounding:
  tests/test_scale.py runs both on the fused decoder (GroupQueryAttention writing its cache in place, Qwen2-VL's
  3-D positions) and on traced ones.
  The package's last check, a few tokens generated through the runtime's Pipeline, runs a big float32 decoder
  by the same pieces (layered.ByLayers): each step through every piece in turn over the Pipeline's own cache,
  so a float32 package's decoder is never resident whole either (Qwen2.5-VL-3B's is 12.3 GB).
  OpenVINO's conversion check of a big quantized decoder runs its reference, the quantized ONNX graph, by the
  same pieces before the IR compiles (ONNX Runtime would make float32 weights of its INT8 ones: 9 GiB at 3B). The
  cut first moves each node computed from weights alone (a DequantizeLinear) beside its first reader, so no
  dequantized weight crosses a cut.
- **Quantization** reads one weight at a time from the data file, keeps AWQ's scales as factors applied on read,
  and writes each quantized tensor as the graph file is written (calibration/weights.py): ONNX Runtime's
  `MatMulNBits` and per-row INT8 embedding, TensorRT's INT4/INT8 `DequantizeLinear` weights, and the float16
  graphs of both (onnxruntime's converter is shown each weight's type and shape only; the weight is halved, in
  chunks, as it is written). A big decoder
  is calibrated on its prefills (each decode step reads every weight for one row of statistics) with fewer
  samples by default (22 for PaliGemma-3B's 2.92B parameters), stopping once their prompts reach 320 tokens a
  sample (Qwen2.5-VL-3B's dynamic-resolution images are 153 to 1,274-token prompts: 9 of its 17), and the fp32 and quantized packages are measured
  one after the other (the fp32 package's teacher-forced logits are those its greedy answer computed, not a second
  pass over it: PaliGemma-3B's fp32 half of the measurement 2.4 -> 1.3 min). A tied embedding table is not
  quantized on its own: the embedding reads the LM head's INT8 blocks (docs/package-format.md), which also spares
  the per-row INT8 pass over the whole table (PaliGemma-3B int4: 10.92 GiB anonymous at the peak before, 4.68
  after).
- **The vision side first.** Where the decoder is big, calibration and the fp32 half of the held-out measurement
  run the vision encoder and projector on every sample first (`Pipeline.encode_media`, the outputs kept in the
  image cache) and let their engines go before the decoder runs, so the two sets of mapped weights are not
  resident together (PaliGemma-3B: the 1.6 GB vision encoder beside the 10 GB decoder; its onnxruntime int4 row
  13.07 -> 11.44 GiB). Same recorded inputs, same quantized graphs byte for byte (tests/test_scale.py).
- **Float16 graphs checked weight by weight.** A float16 package (tensorrt fp16, onnxruntime fp16) is checked
  through ONNX Runtime's CPU, which has no float16 MatMul: by default it widens every float16 weight into a float32
  copy as the session opens (its `FuseFp16InitializerToFp32NodeTransformer`), a float32 copy of the whole decoder
  in anonymous memory. The export's checks (a big model's held-out measurement, every final generation check)
  open float16 graphs `low_memory`: that transformer off, no CPU arena, the nodes in the graph's order, so each weight
  is widened by its Cast as the run reaches it and let go after its MatMul. Slower runs (paligemma-135m-shaped's
  tensorrt fp16 package decodes at 13.3 tok/s instead of 26.5), the same tokens; 831 -> 97 MB anonymous there.
- **OpenVINO gets a big decoder quantized.** OpenVINO's conversion copies a graph's constants
  (`ov.convert_model`'s transformations), its CPU plugin makes its own copy of float32 weights to run them
  (PaliGemma-3B's decoder: ~10 GiB each; its 2.1 GB embedding table is copied too), and NNCF's weight compression
  compiles the whole float32 decoder to collect its statistics. A decoder over 1 GiB bound for INT8/INT4 therefore
  stays ONNX until it is quantized (exporters/openvino_target.py, calibration/openvino.py): verified, calibrated and
  measured in float32 through ONNX Runtime with its weights mapped (its cache held between calls as OpenVINO holds
  its state), the embedding beside it; its weights quantized one at a time in the ONNX graph as for tensorrt (INT4
  blocks with activation-aware scales, INT8 channels, float32 compute), and only then converted to IR, where the CPU
  plugin keeps them compressed; the export checks the IR against the quantized ONNX graph. docs/quantization.md.
  A vision encoder or projector over 1 GiB bound for static INT8 (Qwen2.5-VL-3B's 2.5 GB encoder) likewise stays
  ONNX: calibrated through ONNX Runtime with its INT8 ranges measured in that pass, made static INT8 by the ONNX
  quantizer and then converted, checked against float32 beside the quantized ONNX graph; NNCF's two statistics
  passes over the float32 graph took 7.9 min there. A smaller one is NNCF's, measured in graphs whose reductions are
  listed first, so OpenVINO runs each as its tensor is made instead of holding every measured tensor to the end
  (Qwen2.5-VL-3B's dynamic-resolution encoder on a 4,900-patch calibration image: 10 GiB held before).
- **Still whole**: Core ML converts a traced torch module (coremltools needs the model in memory, in float32, and
  converting to compute in float16 it makes its own copies of the graph's weights: PaliGemma-3B's fp16 export
  peaked at 20.0 GiB anonymous, its 10.9 GiB model and 9.3 GiB decoder); OpenVINO's float packages (fp32, fp16):
  its conversion copies a graph's constants and its CPU plugin makes its own float32 copy of the weights to run
  them (verification, the generation check). Export counts these copies before it loads anything (from the
  checkpoint's headers: exporters/resources.py) and refuses in one line where they clearly do not fit:
  Qwen2.5-VL-3B to Core ML at fp16, int8 or int4 needs about 24.3 GiB, so on this 24 GiB machine it is refused in
  4 s, where the kernel killed it after 110 s (below); to OpenVINO at fp32 or fp16 at least 11.5 GiB, the line
  pointing at int8/int4. Static INT8
  (vision encoders, projectors) goes through onnxruntime's quantize_static, which loads the graph (0.4B
  parameters at PaliGemma-3B's size).

Peak RSS counts memory-mapped graph files, whose pages the kernel can drop and read again; the anonymous
peak is what an export cannot give back. Calibration, the measurement and the export's check against PyTorch
map a big float32 decoder one piece at a time (since 2026-12-07), and so does the final generation check where
ONNX Runtime runs it (onnxruntime, tensorrt); other graphs, quantized or float16 decoders and OpenVINO's float
packages are mapped whole while they run.
"""


def render(results: dict, out: Path) -> None:
    rows = sorted(results.values(), key=lambda r: (r["model"], TARGETS.index(r["target"]), QUANTS.index(r["quant"])))
    machines = list(dict.fromkeys(r["machine"] for r in rows))
    lines = [
        "# Export at real model sizes",
        "",
        "Measured by `python tools/scale.py` (each export its own process, nothing else running): wall time, the",
        "peak resident memory of the export's whole process tree (sampled every 0.2 s): RSS (memory-mapped weight",
        "files included: their pages can be dropped and read again, so they do not exhaust memory) and the",
        "anonymous part alone (what the process cannot give back); and the package's size on disk. Since",
        "2026-12-04 a page shared by processes counts once (Linux's Pss): before, a child forked from the export",
        "counted the parent's pages again (the 19.69 GiB anonymous seen twice for openvino fp32, 2 x 9.85: below).",
        "",
        *(f"Machine: {m} ({', '.join(sorted({r['date'] for r in rows if r['machine'] == m}))})." for m in machines),
        "",
        "| model | target | quant | result | wall | peak RSS | peak anonymous | package | measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        result = "ok" if r["exit"] == 0 else f"exit {r['exit']}: {r['last_line']}"
        if r.get("memory_limit_gb"):
            result += (f" in a {r['memory_limit_gb']} GiB cgroup (its peak, page cache included: "
                       f"{r['cgroup_peak_gb']} GiB; {r['oom_kills']} OOM kills)")
        if r.get("note"):  # e.g. the machine was shared: its wall time is not this export's alone
            result += f" ({r['note']})"
        size = f"{r['package_gb']} GiB" if r.get("package_gb") is not None else "-"
        lines.append(f"| {r['model']} | {r['target']} | {r['quant']} | {result} | {r['wall_s'] / 60:.1f} min | "
                     f"{r['peak_rss_gb']} GiB | {r.get('peak_anon_gb', '-')} GiB | {size} | {r['date']} |")
    missing = [f"{m} {t} {q}" for m in MODELS for t in TARGETS for q in QUANTS if f"{m}-{t}-{q}" not in results]
    if missing:
        lines += ["", f"Not measured yet ({len(missing)}): " + "; ".join(missing) + "."]
    lines += ["", HOW.strip()]
    # a hand-written "## Also seen" section (measurements made outside this script) is kept as it is
    kept = out.read_text().split("\n## Also seen", 1) if out.exists() else []
    if len(kept) == 2:
        lines += ["", "## Also seen" + kept[1].split("\n## ", 1)[0].rstrip()]
    benches = [r for r in rows if r.get("bench")]
    if benches:
        lines += ["", "## Running the packages (`mmedge bench`)", ""]
        for r in benches:
            note = f" ({r['bench_note']})" if r.get("bench_note") else ""
            lines += [f"{r['model']} {r['target']} {r['quant']}{note}:", "", "```", r["bench"].rstrip(), "```", ""]
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    ap.add_argument("--quants", nargs="+", default=list(QUANTS), choices=QUANTS)
    ap.add_argument("--work", type=Path, default=Path("scale-work"), help="packages and export logs")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "scale.md")
    ap.add_argument("--keep", action="store_true", help="keep each package (default: removed once measured)")
    ap.add_argument("--bench", action="store_true", help="run `mmedge bench` on each int4 package")
    ap.add_argument("--memory-limit", type=float, metavar="GIB",
                    help="run each export in a cgroup holding it to this much memory, page cache included")
    ap.add_argument("--note", help="said beside each row measured now (e.g. what else shared the machine)")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    store = args.out.with_suffix(".json")  # every measurement so far, kept beside the page
    results = json.loads(store.read_text()) if store.exists() else {}
    machine = (f"{platform.machine()}{cpu_name()}, {psutil.cpu_count(logical=True)} cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()} {platform.release()}")
    for model in args.models:
        # a built-in checkpoint is built first, in a process of its own: building it is not the export's cost
        subprocess.run([sys.executable, "-c", f"from mmedge.exporters import tiny; tiny.materialize({model!r})"],
                       check=True)
        for target in args.targets:
            for quant in args.quants:
                name = f"{model}-{target}-{quant}"
                package = args.work / name
                if args.memory_limit:  # kept beside the unlimited row
                    name += f"@{args.memory_limit:g}GiB"
                shutil.rmtree(package, ignore_errors=True)
                print(f"{name}: exporting ...", flush=True)
                cage = MemoryCage(int(args.memory_limit * 2**30)) if args.memory_limit else None
                try:
                    if cage:
                        cage.drop_page_cache()
                    result = measure(mmedge("export", "--model", model, "--target", target, "--quant", quant,
                                            "-o", str(package)), args.work / f"{name}.log", cage)
                finally:
                    cage.close() if cage else None
                if cage:
                    result["memory_limit_gb"] = args.memory_limit
                result.update(model=model, target=target, quant=quant, machine=machine,
                              date=time.strftime("%Y-%m-%d"), package_gb=size_gb(package))
                if args.note:
                    result["note"] = args.note
                if args.bench and result["exit"] == 0 and quant == "int4" and target != "coreml":
                    bench = subprocess.run(mmedge("bench", str(package), "--threads", str(psutil.cpu_count())),
                                           capture_output=True, text=True)
                    result["bench"] = bench.stdout if bench.returncode == 0 else bench.stderr
                results[name] = result
                store.write_text(json.dumps(results, indent=1))
                render(results, args.out)
                print(f"{name}: exit {result['exit']}, {result['wall_s']:.0f} s, peak {result['peak_rss_gb']} GB "
                      f"({result['peak_anon_gb']} GB anonymous), "
                      f"package {result['package_gb']} GB", flush=True)
                if not args.keep:
                    shutil.rmtree(package, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
