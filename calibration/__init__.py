"""mmedge.calibration: calibration data and per-graph quantization.

Not built yet (see the quantization issue): exports are fp32 only for now and
`mmedge export` says so if another precision is asked for.
"""
