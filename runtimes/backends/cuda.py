"""The few CUDA runtime calls the TensorRT backend needs, through ctypes (no cuda-python, no torch).

libcudart comes with every CUDA install (JetPack has it in /usr/local/cuda)
and with the tensorrt pip wheels (nvidia-cuda-runtime-cu12). Device memory is
held by `DeviceBuffer`s, freed when they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

import numpy as np

from mmedge.errors import MmedgeError

# cudaMemcpyKind
HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE = 1, 2, 3
# cudaDeviceAttr
MULTIPROCESSOR_COUNT, COMPUTE_CAPABILITY_MAJOR, COMPUTE_CAPABILITY_MINOR = 16, 75, 76

_lib = None


def _candidates() -> list[str]:
    """Where libcudart may be, most specific first: the wheel's, the system's, then plain names."""
    paths = []
    for root in [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]:
        if root:
            paths += sorted(glob.glob(os.path.join(root, "lib*", "libcudart.so*")))
    for site in sys.path:  # the nvidia-cuda-runtime wheel that tensorrt's wheels depend on
        paths += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
    found = ctypes.util.find_library("cudart")
    return paths + ([found] if found else []) + ["libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"]


def cudart():
    """The loaded CUDA runtime library; one clear error if there is none."""
    global _lib
    if _lib is None:
        for name in _candidates():
            try:
                _lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise MmedgeError("the CUDA runtime (libcudart) is not installed here; TensorRT needs an NVIDIA GPU with "
                              "CUDA (JetPack on Jetson, or `pip install tensorrt` on x86)")
        _lib.cudaGetErrorString.restype = ctypes.c_char_p
    return _lib


def check(status: int, what: str) -> None:
    if status != 0:
        message = cudart().cudaGetErrorString(status).decode()
        raise MmedgeError(f"CUDA {what} failed: {message} (error {status})")


def attribute(which: int, device: int = 0) -> int:
    value = ctypes.c_int()
    check(cudart().cudaDeviceGetAttribute(ctypes.byref(value), which, device), "reading the GPU's properties")
    return value.value


def compute_capability(device: int = 0) -> tuple[int, int]:
    return attribute(COMPUTE_CAPABILITY_MAJOR, device), attribute(COMPUTE_CAPABILITY_MINOR, device)


def device_count() -> int:
    """GPUs visible; 0 when CUDA says there are none; CUDA's own error (e.g. a driver too old) otherwise."""
    count = ctypes.c_int(0)
    status = cudart().cudaGetDeviceCount(ctypes.byref(count))
    if status == 100:  # cudaErrorNoDevice
        return 0
    check(status, "looking for GPUs")
    return count.value


class Stream:
    def __init__(self):
        self.handle = ctypes.c_void_p()
        check(cudart().cudaStreamCreate(ctypes.byref(self.handle)), "creating a stream")

    @property
    def ptr(self) -> int:
        return self.handle.value or 0

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "synchronizing the stream")

    def __del__(self):
        if _lib is not None and self.handle:
            _lib.cudaStreamDestroy(self.handle)


class DeviceBuffer:
    """`nbytes` of device memory (at least 1 byte: TensorRT wants a valid address for empty tensors too)."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.handle = ctypes.c_void_p()
        check(cudart().cudaMalloc(ctypes.byref(self.handle), ctypes.c_size_t(max(1, self.nbytes))),
              f"allocating {self.nbytes} bytes on the GPU")

    @property
    def ptr(self) -> int:
        return self.handle.value

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > self.nbytes:
            raise MmedgeError(f"{array.nbytes} bytes do not fit a device buffer of {self.nbytes}")
        check(cudart().cudaMemcpyAsync(self.handle, array.ctypes.data_as(ctypes.c_void_p),
                                       ctypes.c_size_t(array.nbytes), HOST_TO_DEVICE, stream.handle), "a copy to the GPU")

    def download(self, array: np.ndarray, stream: Stream) -> None:
        """Into the C-contiguous `array` (the stream is synchronized after)."""
        check(cudart().cudaMemcpyAsync(array.ctypes.data_as(ctypes.c_void_p), self.handle,
                                       ctypes.c_size_t(array.nbytes), DEVICE_TO_HOST, stream.handle), "a copy from the GPU")
        stream.synchronize()

    def zero(self, stream: Stream) -> None:
        check(cudart().cudaMemsetAsync(self.handle, 0, ctypes.c_size_t(max(1, self.nbytes)), stream.handle),
              "clearing GPU memory")

    def __del__(self):
        if _lib is not None and self.handle:
            _lib.cudaFree(self.handle)


def copy_rows(dst: DeviceBuffer, dst_pitch: int, dst_offset: int, src: DeviceBuffer, src_pitch: int,
              row_bytes: int, rows: int, stream: Stream) -> None:
    """`rows` rows of `row_bytes` from src (rows `src_pitch` apart) into dst at `dst_offset` (rows `dst_pitch`
    apart), on the GPU: how new key/value slots [b, h, n, d] land in the cache [b, h, max_context, d]."""
    if rows == 0 or row_bytes == 0:
        return
    check(cudart().cudaMemcpy2DAsync(ctypes.c_void_p(dst.ptr + dst_offset), ctypes.c_size_t(dst_pitch),
                                     src.handle, ctypes.c_size_t(src_pitch), ctypes.c_size_t(row_bytes),
                                     ctypes.c_size_t(rows), DEVICE_TO_DEVICE, stream.handle), "writing the KV cache")
