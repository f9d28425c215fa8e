"""The decoder for ONNX Runtime written op by op with its fused CPU kernels, instead of traced.

Traced from PyTorch, a SmolLM2-135M decoder step is ~1,700 ONNX nodes: RMSNorm
as six, rotary embedding as a dozen, attention as reshapes, expands,
transposes, two MatMuls and a softmax, per layer, over the whole
preallocated cache. With INT4 weights a step reads ~90 MB, ~3 ms of memory
traffic on a 2-core machine, yet took ~21 ms: the time went to running small
kernels. Built here from the same weights with ONNX Runtime's contrib ops it
is ~11 nodes a layer, and the INT4 step takes ~5.5 ms (docs/performance.md):

    SkipSimplifiedLayerNormalization (residual add + RMSNorm)
    MatMul  [hidden -> q|k|v]  (one packed projection)
    GroupQueryAttention  (rotary, causal GQA, KV cache written in place)
    MatMul  [o_proj]
    SkipSimplifiedLayerNormalization
    MatMul  [hidden -> gate|up], Split, Sigmoid, Mul, Mul  (SwiGLU)
    MatMul  [down_proj]

Contract (kv_cache storage "in_place"): inputs inputs_embeds [batch, seq,
hidden], seqlens_k [batch] int32 (tokens seen after this step, minus one),
total_sequence_length [] int32, past.{i}.key/value [batch, kv_heads,
max_context, head_dim]; outputs logits [batch, 1, vocab] (last position only)
and present.{i}.key/value of the same shape as the past, which the runtime
binds to the past buffers so that GroupQueryAttention writes each new key and
value into its slot and nothing else moves.

Built here: Llama-style blocks (RMSNorm with weight, SwiGLU MLP, optional
q/k/v biases) and Gemma's (RMSNorm scaling by 1 + weight, GELU-tanh MLP,
Gemma 2/3's norms after attention and MLP, Gemma 3's QK norm, attention and
final logit soft-capping, a rotary base per layer type); linear positions
(rotary inside the kernel, shifted by the scheme's position offset), or
Qwen2-VL's 3-D ones (M-RoPE, in blocks): then the graph also takes
position_ids [3, batch, seq] and rotates q and k with MRotaryEmbedding before
attention, which runs without rotary of its own.

Attention that is not plain causal (PaliGemma's bidirectional prefix, Gemma
3's bidirectional image blocks) or has sliding-window layers runs the kernel
with causal=0 and the runtime's additive masks as attention_bias: the graph
then takes the traced decoder's mask inputs (`attention_mask` [batch, 1, seq,
total], and `sliding_attention_mask` for the windowed layers), sized to the
tokens so far rather than to the whole buffer. `supports()` says whether a
model qualifies; the exporter verifies the graph against PyTorch either way.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mmedge.exporters import lazy
from mmedge.exporters.family import Parts
from mmedge.exporters.graphs import DecoderGraph, GraphJob, kv_names

MS = "com.microsoft"
# the transformers decoder stacks of Llama blocks, and of Gemma blocks, that this builder reproduces exactly
LLAMA_STACKS = ("LlamaModel", "Qwen2Model", "Qwen2VLTextModel", "Qwen2_5_VLTextModel")
GEMMA_STACKS = ("GemmaModel", "Gemma2Model", "Gemma3TextModel")
INPUTS = ("inputs_embeds", "seqlens_k", "total_sequence_length")
# MLP activations of the gate: module class -> how the graph computes it
ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}
# RMSNorms that scale by (1 + weight): Gemma's
UNIT_OFFSET_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


def layer_windows(stack) -> list[int | None]:
    """Each layer's sliding window as its attention module applies it (None: global). A Llama config may carry
    a `sliding_window` value that Llama's attention ignores; the module's own attribute is what counts."""
    return [getattr(layer.self_attn, "sliding_window", None) for layer in stack.layers]


def takes_masks(parts: Parts, attention: str) -> bool:
    """Whether the graph takes the runtime's masks as attention bias (else: causal inside the kernel)."""
    return attention != "causal" or any(layer_windows(parts.text_model))


def _rope_types(stack) -> dict[str | None, str]:
    """The rotary kind per layer type (None: one for all layers)."""
    kind = getattr(stack.rotary_emb, "rope_type", "default")
    return dict(kind) if isinstance(kind, dict) else {None: kind}


def supports(parts: Parts, attention: str) -> str | None:
    """None when the decoder can be built here, else why not (one line)."""
    stack = parts.text_model
    name = type(stack).__name__
    if name not in LLAMA_STACKS + GEMMA_STACKS:
        return f"decoder {name} is not one of {', '.join(LLAMA_STACKS + GEMMA_STACKS)}"
    if any(layer_windows(stack)) and len(parts.mask_names) < 2:
        return "sliding-window layers without a sliding-window mask"
    if takes_masks(parts, attention) and parts.position_rows > 1:
        return f"attention pattern {attention!r} or sliding windows with 3-D positions"
    if parts.position_rows > 1 and getattr(stack.config, "rope_parameters", {}).get("mrope_interleaved"):
        return "interleaved M-RoPE sections"
    for rope in _rope_types(stack).values():
        if rope not in ("default", "linear", "llama3"):  # these fix inv_freq once; dynamic kinds change it per length
            return f"rotary scaling {rope!r}"
    if parts.head_dim % 16:
        return f"head size {parts.head_dim} (GroupQueryAttention's rotary needs a multiple of 16)"
    head = getattr(parts.head, "lm_head", parts.head)  # SoftcapHead wraps the Linear
    if not isinstance(head, torch.nn.Linear):
        return f"output head {type(head).__name__} is not a plain Linear"
    act = type(stack.layers[0].mlp.act_fn).__name__
    if act not in ACTIVATIONS:
        return f"MLP activation {act} is not one of {', '.join(ACTIVATIONS)}"
    return None


class _Builder:
    """Nodes and initializers of a graph being built. Weights come as arrays (small tables, written inline) or as
    functions that produce them (`deferred`): a model's weights are read from the checkpoint one at a time while
    the graph file is written (lazy.write_model), never all held at once."""

    def __init__(self):
        self.nodes, self.inits = [], []
        self.deferred: dict[str, Callable[[], np.ndarray]] = {}
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def weight(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def weights(self, hint: str, *params: torch.Tensor, transpose: bool = False) -> str:
        """The model's `params` joined along their first axis (transposed: [in, out] for MatMul), deferred."""
        name = self.name(hint)
        rows = sum(p.shape[0] for p in params)
        dims = [rows, *params[0].shape[1:]]
        self.inits.append(TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims[::-1] if transpose else dims))

        def value() -> np.ndarray:
            if not transpose:
                joined = np.concatenate([lazy.values(p) for p in params]) if len(params) > 1 else lazy.values(params[0])
                return np.ascontiguousarray(joined, dtype=np.float32)
            out, at = np.empty(dims[::-1], np.float32), 0  # each part transposed into its columns: no joined copy
            for p in params:
                part = lazy.values(p)
                lazy.transposed(part, out=out[:, at:at + part.shape[0]])
                at += part.shape[0]
            return out

        self.deferred[name] = value
        return name

    def weight_int(self, hint: str, values: list[int]) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs=None, **attrs):
        outs = outputs or [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs if len(outs) > 1 else outs[0]

    def linear(self, x: str, layer: torch.nn.Linear | list[torch.nn.Linear], hint: str) -> str:
        """x through `layer`, or through several layers reading x as one MatMul over their weights joined along
        the outputs (q|k|v, gate|up: one kernel call and one read of x a token), biases likewise."""
        layers = layer if isinstance(layer, list) else [layer]
        y = self.op("MatMul", [x, self.weights(hint, *(m.weight for m in layers), transpose=True)])
        if layers[0].bias is not None:
            y = self.op("Add", [y, self.weights(hint + "_bias", *(m.bias for m in layers))])
        return y


def _rotary_tables(stack, max_positions: int, layer_type: str | None = None, offset: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim / 2] from the model's own rotary module (its scaling included), of the
    layer type's frequencies where they differ per type (Gemma 3); row p holds position p + offset."""
    rotary = stack.rotary_emb
    prefix = f"{layer_type}_" if layer_type else ""
    inv_freq = getattr(rotary, f"{prefix}inv_freq")
    positions = np.arange(offset, offset + max_positions, dtype=np.float64)
    freqs = np.outer(positions, inv_freq.double().numpy())
    scale = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    return (np.cos(freqs) * scale).astype(np.float32), (np.sin(freqs) * scale).astype(np.float32)


def build(parts: Parts, max_positions: int, attention: str = "causal", position_offset: int = 0
          ) -> tuple[onnx.ModelProto, dict[str, Callable[[], np.ndarray]]]:
    """The fused decoder graph of `parts`, and its deferred weights (name -> function giving the array) that
    lazy.write_model writes in."""
    stack = parts.text_model
    cfg = stack.config
    heads, kv_heads, dim = cfg.num_attention_heads, parts.num_kv_heads, parts.head_dim
    b = _Builder()
    windows = layer_windows(stack)
    masked = takes_masks(parts, attention)
    layer_types = getattr(cfg, "layer_types", None) if None not in _rope_types(stack) else None
    tables: dict[str | None, list[str]] = {}

    def rotary_caches(i: int) -> list[str]:
        kind = layer_types[i] if layer_types else None
        if kind not in tables:
            cos, sin = _rotary_tables(stack, max_positions, kind, position_offset)
            tables[kind] = [b.weight("cos_cache", cos), b.weight("sin_cache", sin)]
        return tables[kind]

    def gamma(module) -> str:
        name = b.weights("norm", module.weight)
        if type(module).__name__ in UNIT_OFFSET_NORMS:
            plain = b.deferred[name]
            b.deferred[name] = lambda: plain() + np.float32(1.0)
        return name

    def eps(module) -> float:
        return float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))

    def rms(x: str, module) -> str:
        return b.op("SimplifiedLayerNormalization", [x, gamma(module)], axis=-1, epsilon=eps(module), stash_type=1)

    def norm(x: str, residual: str | None, module) -> tuple[str, str]:
        if residual is None:
            return rms(x, module), x
        out, total = b.name("normed"), b.name("residual")
        b.op("SkipSimplifiedLayerNormalization", [x, residual, gamma(module)], domain=MS,
             outputs=[out, "", "", total], epsilon=eps(module))
        return out, total

    def head_norm(x: str, n_heads: int, module) -> str:
        """RMSNorm over each head's slice of [batch, seq, n_heads * dim] (QK norm)."""
        normed = rms(b.op("Reshape", [x, b.weight_int("heads", [0, 0, n_heads, dim])]), module)
        return b.op("Reshape", [normed, b.weight_int("flat", [0, 0, n_heads * dim])])

    mrope = parts.position_rows > 1
    sections = [int(n) for n in getattr(stack.rotary_emb, "mrope_section", [])]

    def attention_op(i: int, qkv: str, attn) -> str:
        """GroupQueryAttention over the packed q|k|v (or q, k, v after QK norm), rotary inside it (linear
        positions) or applied before it from the 3-D positions (M-RoPE); masked by the bias where it takes one."""
        context = b.name("attention")
        caches = rotary_caches(i)
        key = value = ""
        qk_norm = getattr(attn, "q_norm", None) is not None
        if mrope or qk_norm:
            q, key, value = b.op("Split", [qkv, b.weight_int("qkv_sizes", [heads * dim, kv_heads * dim,
                                                                           kv_heads * dim])], n_out=3, axis=-1)
            qkv = q
            if qk_norm:
                qkv, key = head_norm(qkv, heads, attn.q_norm), head_norm(key, kv_heads, attn.k_norm)
            if mrope:
                cos, sin = caches
                qkv = b.op("MRotaryEmbedding", [qkv, "position_ids", cos, sin], domain=MS, num_heads=heads,
                           mrope_section=sections)
                key = b.op("MRotaryEmbedding", [key, "position_ids", cos, sin], domain=MS, num_heads=kv_heads,
                           mrope_section=sections)
                caches = []
        # optional inputs: cos_cache, sin_cache, position_ids, attention_bias
        optional = [*(caches or ["", ""]), *(["", parts.mask_names[1 if windows[i] else 0]] if masked else [])]
        softcap = getattr(attn, "attn_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None)
        b.op("GroupQueryAttention",
             [qkv, key, value, f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_sequence_length", *optional],
             domain=MS, outputs=[context, f"present.{i}.key", f"present.{i}.value"],
             num_heads=heads, kv_num_heads=kv_heads, do_rotary=0 if mrope else 1, rotary_interleaved=0,
             scale=float(attn.scaling), causal=0 if masked else 1, softcap=float(softcap or 0.0))
        return context

    def mlp_op(x: str, mlp, i: int) -> str:
        gate_up = b.linear(x, [mlp.gate_proj, mlp.up_proj], f"layers.{i}.gate_up")
        width = mlp.gate_proj.weight.shape[0]
        gate, up = b.op("Split", [gate_up, b.weight_int("gate_up_sizes", [width, width])], n_out=2, axis=-1)
        if ACTIVATIONS[type(mlp.act_fn).__name__] == "gelu_tanh":
            act = b.op("FastGelu", [gate], domain=MS)  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        else:
            act = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
        return b.linear(b.op("Mul", [act, up]), mlp.down_proj, f"layers.{i}.down_proj")

    hidden, residual = "inputs_embeds", None
    for i, layer in enumerate(stack.layers):
        attn = layer.self_attn
        x, residual = norm(hidden, residual, layer.input_layernorm)
        qkv = b.linear(x, [attn.q_proj, attn.k_proj, attn.v_proj], f"layers.{i}.qkv")
        out = b.linear(attention_op(i, qkv, attn), attn.o_proj, f"layers.{i}.o_proj")
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2/3: a norm after attention and after the MLP
            x, residual = norm(rms(out, layer.post_attention_layernorm), residual, layer.pre_feedforward_layernorm)
            hidden = rms(mlp_op(x, layer.mlp, i), layer.post_feedforward_layernorm)
        else:
            x, residual = norm(out, residual, layer.post_attention_layernorm)
            hidden = mlp_op(x, layer.mlp, i)
    x, _ = norm(hidden, residual, stack.norm)
    last = b.op("Slice", [x, b.weight_int("minus_one", [-1]), b.weight_int("end", [np.iinfo(np.int64).max]),
                          b.weight_int("axis", [1])])
    logits = b.linear(last, getattr(parts.head, "lm_head", parts.head), "lm_head")
    cap = getattr(parts.head, "softcap", None)
    if cap:  # final logit soft-capping: tanh(x / cap) * cap
        cap_value = b.weight("softcap", np.array(cap, np.float32))
        b.op("Mul", [b.op("Tanh", [b.op("Div", [logits, cap_value])]), cap_value])
    b.nodes[-1].output[0] = "logits"  # the last node: the head's MatMul, its bias Add, or the soft-cap's Mul

    kv = ["batch", kv_heads, "max_context", dim]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", parts.hidden_size]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    if masked:
        inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 1, "seq", "total"])
                   for name in parts.mask_names]
    if mrope:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [3, "batch", "seq"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, parts.vocab_size])]
    for i in range(parts.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kind}", TensorProto.FLOAT, kv))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv))
    graph = helper.make_graph(b.nodes, "decoder", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)],
                              producer_name="mmedge")
    return model, b.deferred


class InPlaceReference(torch.nn.Module):
    """PyTorch behind the fused graph's contract, to verify it: the traced decoder fed the filled slots.

    seqlens_k / total_sequence_length say how many slots are filled; the
    new keys and values land in copies of the past buffers at their slots,
    the rest of each buffer unchanged (as GroupQueryAttention leaves it).
    Where the graph takes masks they come in as the traced decoder takes
    them (over the filled slots and the new tokens); else attention is causal.
    """

    def __init__(self, parts: Parts, max_context: int, attention: str = "causal", position_offset: int = 0):
        super().__init__()
        self.parts, self.max_context = parts, max_context
        self.attention, self.position_offset = attention, position_offset
        self.n_masks = len(parts.mask_names) if takes_masks(parts, attention) else 0
        self.decoder = DecoderGraph(parts, "buffer")

    def forward(self, inputs_embeds, seqlens_k, total_sequence_length, *rest):
        batch, n = inputs_embeds.shape[:2]
        total = int(total_sequence_length)
        start = total - n
        masks, rest = list(rest[: self.n_masks]), rest[self.n_masks :]
        if not masks:
            mask = torch.zeros(batch, 1, n, total)
            mask[..., start:] = torch.where(torch.tril(torch.ones(n, n, dtype=torch.bool)), 0.0,
                                            torch.finfo(torch.float32).min)
            masks = [mask]
        if self.parts.position_rows > 1:  # the 3-D positions come in (M-RoPE)
            positions, past = rest[0], rest[1:]
        else:
            positions, past = torch.arange(start, total).repeat(batch, 1) + self.position_offset, rest
        out = self.decoder(inputs_embeds, *masks, positions, *[p[:, :, :start] for p in past])
        presents = []
        for buffer, new in zip(past, out[1:]):
            full = buffer.clone()
            full[:, :, start:total] = new
            presents.append(full)
        return (out[0], *presents)

    def build(self):
        return build(self.parts, self.max_context, self.attention, self.position_offset)


# (batch, new tokens, filled slots): GroupQueryAttention takes several new tokens after a filled cache
# only at batch 1, which is all the runtime feeds
CHECKS = ((1, 3, 4), (2, 1, 9), (1, 6, 0), (2, 5, 0))
CHECK_SLOTS = 32  # a check's cache buffer length (more than any check fills)


def _random_mask(batch: int, n: int, start: int, generator: torch.Generator) -> torch.Tensor:
    """An additive mask [batch, 1, n, start + n] of any pattern (both ways, holes), each token seeing itself."""
    keep = torch.rand(batch, 1, n, start + n, generator=generator) > 0.3
    keep[..., torch.arange(n), start + torch.arange(n)] = True
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)


def decoder_job(parts: Parts, max_context: int, generator: torch.Generator, attention: str = "causal",
                position_offset: int = 0) -> GraphJob:
    """The decoder's GraphJob for kv_cache storage "in_place" (export builds, verification traces nothing). The
    checks' cache buffers are CHECK_SLOTS long, not max_context: the graph takes any buffer length (the runtime's
    is max_context, run by the package's generation check). At LLaVA-1.5-7B's size (32 layers of 32 heads x 128,
    1088 slots) full-length buffers took 7.8 GiB for the check inputs alone, and as much again for PyTorch's
    reference outputs."""
    kv = (parts.num_kv_heads, min(max_context, CHECK_SLOTS), parts.head_dim)
    masked = takes_masks(parts, attention)

    def inputs(batch: int, n: int, start: int) -> tuple:
        embeds = torch.randn(batch, n, parts.hidden_size, generator=generator)
        past = [torch.randn(batch, *kv, generator=generator) for _ in range(2 * parts.num_layers)]
        extra = [_random_mask(batch, n, start, generator) for _ in parts.mask_names] if masked else []
        if parts.position_rows > 1:  # rows that differ, as an image's (frame, row, column) do; within the table
            linear = torch.arange(start, start + n).repeat(batch, 1)
            extra.append(torch.stack([(linear - torch.randint(0, 3, linear.shape, generator=generator)).clamp(min=0)
                                      for _ in range(parts.position_rows)]))
        return (embeds, torch.full((batch,), start + n - 1, dtype=torch.int32),
                torch.tensor(start + n, dtype=torch.int32), *extra, *past)

    past_names, present_names = kv_names("past", parts.num_layers), kv_names("present", parts.num_layers)
    return GraphJob(
        "decoder",
        InPlaceReference(parts, max_context, attention, position_offset),
        [*INPUTS, *(parts.mask_names if masked else []), *(["position_ids"] if parts.position_rows > 1 else []),
         *past_names],
        ["logits", *present_names],
        {},
        inputs(*CHECKS[0]),
        [inputs(*c) for c in CHECKS],
        kv_storage="in_place",
    )
