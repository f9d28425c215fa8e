"""mmedge.calibration: calibration data and per-graph quantization.

- plan.py: what precision each graph gets (`--quant int4`, `--quant int8,decoder=int4`, ...)
- data.py: calibration sets (builtin, an image folder, a JSONL of {image, prompt}), split into
  samples that calibrate and held-out samples that measure
- onnxruntime.py: ONNX graph quantizers (INT8 QDQ, INT8 dynamic, INT8 embedding, INT4
  MatMulNBits with activation-aware scaling, fp16), the recording of each graph's real
  inputs through the runtime pipeline, and the accuracy report against fp32

Other targets (OpenVINO, TensorRT, Core ML) reuse data.py and the recorded inputs.
"""
