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
    MatMul gate, MatMul up, Sigmoid, Mul, Mul  (SwiGLU)
    MatMul  [down_proj]

Contract (kv_cache storage "in_place"): inputs inputs_embeds [batch, seq,
hidden], seqlens_k [batch] int32 (tokens seen after this step, minus one),
total_sequence_length [] int32, past.{i}.key/value [batch, kv_heads,
max_context, head_dim]; outputs logits [batch, 1, vocab] (last position only)
and present.{i}.key/value of the same shape as the past, which the runtime
binds to the past buffers so that GroupQueryAttention writes each new key and
value into its slot and nothing else moves.

Only what GroupQueryAttention expresses is built here: causal attention
(no prefix or image blocks, no holes), Llama-style blocks (RMSNorm with
weight, SwiGLU MLP, optional q/k/v biases, no QK norm, no soft-capping), and
linear positions, or Qwen2-VL's 3-D ones (M-RoPE, in blocks): then the graph
also takes position_ids [3, batch, seq] and rotates q and k with
MRotaryEmbedding before attention, which runs without rotary of its own.
`supports()` says whether a model qualifies; the exporter verifies the graph
against PyTorch either way.
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
# the transformers decoder stacks built of Llama blocks that this builder reproduces exactly
LLAMA_STACKS = ("LlamaModel", "Qwen2Model", "Qwen2VLTextModel", "Qwen2_5_VLTextModel")
INPUTS = ("inputs_embeds", "seqlens_k", "total_sequence_length")


def supports(parts: Parts, attention: str) -> str | None:
    """None when the decoder can be built here, else why not (one line)."""
    stack = parts.text_model
    name = type(stack).__name__
    if name not in LLAMA_STACKS:
        return f"decoder {name} is not one of {', '.join(LLAMA_STACKS)}"
    if attention != "causal":
        return f"attention pattern {attention!r} is not plain causal"
    if getattr(stack.config, "sliding_window", None) and getattr(stack.config, "use_sliding_window", True):
        return "sliding-window attention"
    if parts.position_rows > 1 and getattr(stack.config, "rope_parameters", {}).get("mrope_interleaved"):
        return "interleaved M-RoPE sections"
    rope = getattr(stack.rotary_emb, "rope_type", "default")
    if rope not in ("default", "linear", "llama3"):  # these fix inv_freq once; dynamic kinds change it per length
        return f"rotary scaling {rope!r}"
    if parts.head_dim % 16:
        return f"head size {parts.head_dim} (GroupQueryAttention's rotary needs a multiple of 16)"
    head = parts.head
    if not isinstance(head, torch.nn.Linear):
        return f"output head {type(head).__name__} is not a plain Linear"
    act = type(stack.layers[0].mlp.act_fn).__name__
    if act not in ("SiLU", "SiLUActivation"):
        return f"MLP activation {act} is not SiLU"
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
            joined = np.concatenate([lazy.values(p) for p in params]) if len(params) > 1 else lazy.values(params[0])
            return np.ascontiguousarray(joined.T if transpose else joined, dtype=np.float32)

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

    def linear(self, x: str, layer: torch.nn.Linear, hint: str) -> str:
        y = self.op("MatMul", [x, self.weights(hint, layer.weight, transpose=True)])
        if layer.bias is not None:
            y = self.op("Add", [y, self.weights(hint + "_bias", layer.bias)])
        return y


def _rotary_tables(stack, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim / 2] from the model's own rotary module (its scaling included)."""
    rotary = stack.rotary_emb
    freqs = np.outer(np.arange(max_positions, dtype=np.float64), rotary.inv_freq.double().numpy())
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return (np.cos(freqs) * scale).astype(np.float32), (np.sin(freqs) * scale).astype(np.float32)


def build(parts: Parts, max_positions: int) -> tuple[onnx.ModelProto, dict[str, Callable[[], np.ndarray]]]:
    """The fused decoder graph of `parts`, and its deferred weights (name -> function giving the array) that
    lazy.write_model writes in."""
    stack = parts.text_model
    cfg = stack.config
    heads, kv_heads, dim = cfg.num_attention_heads, parts.num_kv_heads, parts.head_dim
    b = _Builder()
    cos, sin = _rotary_tables(stack, max_positions)
    cos, sin = b.weight("cos_cache", cos), b.weight("sin_cache", sin)

    def norm(x: str, residual: str | None, module) -> tuple[str, str]:
        gamma = b.weights("norm", module.weight)
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        if residual is None:
            return b.op("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=eps, stash_type=1), x
        out, total = b.name("normed"), b.name("residual")
        b.op("SkipSimplifiedLayerNormalization", [x, residual, gamma], domain=MS, outputs=[out, "", "", total],
             epsilon=eps)
        return out, total

    mrope = parts.position_rows > 1
    sections = [int(n) for n in getattr(stack.rotary_emb, "mrope_section", [])]

    def attention(i: int, qkv: str, attn) -> str:
        """GroupQueryAttention over the packed q|k|v, rotary inside it (linear positions) or applied before it
        from the 3-D positions (M-RoPE)."""
        context = b.name("attention")
        caches = [cos, sin]
        if mrope:
            q, k, v = b.op("Split", [qkv, b.weight_int("qkv_sizes", [heads * dim, kv_heads * dim, kv_heads * dim])],
                           n_out=3, axis=-1)
            q = b.op("MRotaryEmbedding", [q, "position_ids", cos, sin], domain=MS, num_heads=heads,
                     mrope_section=sections)
            k = b.op("MRotaryEmbedding", [k, "position_ids", cos, sin], domain=MS, num_heads=kv_heads,
                     mrope_section=sections)
            qkv, key, value, caches = q, k, v, []
        else:
            key = value = ""
        b.op("GroupQueryAttention",
             [qkv, key, value, f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_sequence_length", *caches],
             domain=MS, outputs=[context, f"present.{i}.key", f"present.{i}.value"],
             num_heads=heads, kv_num_heads=kv_heads, do_rotary=0 if mrope else 1, rotary_interleaved=0,
             scale=float(attn.scaling))
        return context

    hidden, residual = "inputs_embeds", None
    for i, layer in enumerate(stack.layers):
        attn, mlp = layer.self_attn, layer.mlp
        x, residual = norm(hidden, residual, layer.input_layernorm)
        qkv = b.op("MatMul", [x, b.weights(f"layers.{i}.qkv", attn.q_proj.weight, attn.k_proj.weight,
                                           attn.v_proj.weight, transpose=True)])
        if attn.q_proj.bias is not None:
            qkv = b.op("Add", [qkv, b.weights(f"layers.{i}.qkv_bias", attn.q_proj.bias, attn.k_proj.bias,
                                              attn.v_proj.bias)])
        out = b.linear(attention(i, qkv, attn), attn.o_proj, f"layers.{i}.o_proj")
        x, residual = norm(out, residual, layer.post_attention_layernorm)
        gate = b.linear(x, mlp.gate_proj, f"layers.{i}.gate_proj")
        up = b.linear(x, mlp.up_proj, f"layers.{i}.up_proj")
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        hidden = b.linear(act, mlp.down_proj, f"layers.{i}.down_proj")
    x, _ = norm(hidden, residual, stack.norm)
    last = b.op("Slice", [x, b.weight_int("minus_one", [-1]), b.weight_int("end", [np.iinfo(np.int64).max]),
                          b.weight_int("axis", [1])])
    b.linear(last, parts.head, "lm_head")
    b.nodes[-1].output[0] = "logits"  # the head's MatMul, or the bias Add after it

    kv = ["batch", kv_heads, "max_context", dim]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", parts.hidden_size]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
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
    """

    def __init__(self, parts: Parts, max_context: int):
        super().__init__()
        self.parts, self.max_context = parts, max_context
        self.decoder = DecoderGraph(parts, "buffer")

    def forward(self, inputs_embeds, seqlens_k, total_sequence_length, *rest):
        batch, n = inputs_embeds.shape[:2]
        total = int(total_sequence_length)
        start = total - n
        mask = torch.zeros(batch, 1, n, total)
        mask[..., start:] = torch.where(torch.tril(torch.ones(n, n, dtype=torch.bool)), 0.0,
                                        torch.finfo(torch.float32).min)
        if self.parts.position_rows > 1:  # the 3-D positions come in (M-RoPE)
            positions, past = rest[0], rest[1:]
        else:
            positions, past = torch.arange(start, total).repeat(batch, 1), rest
        out = self.decoder(inputs_embeds, mask, positions, *[p[:, :, :start] for p in past])
        presents = []
        for buffer, new in zip(past, out[1:]):
            full = buffer.clone()
            full[:, :, start:total] = new
            presents.append(full)
        return (out[0], *presents)

    def build(self):
        return build(self.parts, self.max_context)


# (batch, new tokens, filled slots): GroupQueryAttention takes several new tokens after a filled cache
# only at batch 1, which is all the runtime feeds
CHECKS = ((1, 3, 4), (2, 1, 9), (1, 6, 0), (2, 5, 0))


def decoder_job(parts: Parts, max_context: int, generator: torch.Generator) -> GraphJob:
    """The decoder's GraphJob for kv_cache storage "in_place" (export builds, verification traces nothing)."""
    kv = (parts.num_kv_heads, max_context, parts.head_dim)

    def inputs(batch: int, n: int, start: int) -> tuple:
        embeds = torch.randn(batch, n, parts.hidden_size, generator=generator)
        past = [torch.randn(batch, *kv, generator=generator) for _ in range(2 * parts.num_layers)]
        extra = []
        if parts.position_rows > 1:  # rows that differ, as an image's (frame, row, column) do; within the table
            linear = torch.arange(start, start + n).repeat(batch, 1)
            extra = [torch.stack([(linear - torch.randint(0, 3, linear.shape, generator=generator)).clamp(min=0)
                                  for _ in range(parts.position_rows)])]
        return (embeds, torch.full((batch,), start + n - 1, dtype=torch.int32),
                torch.tensor(start + n, dtype=torch.int32), *extra, *past)

    past_names, present_names = kv_names("past", parts.num_layers), kv_names("present", parts.num_layers)
    return GraphJob(
        "decoder",
        InPlaceReference(parts, max_context),
        [*INPUTS, *(["position_ids"] if parts.position_rows > 1 else []), *past_names],
        ["logits", *present_names],
        {},
        inputs(*CHECKS[0]),
        [inputs(*c) for c in CHECKS],
        kv_storage="in_place",
    )
