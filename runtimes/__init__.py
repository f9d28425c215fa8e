"""mmedge.runtimes: the torch-free runtime (numpy, tokenizers, Pillow, one backend)."""

from mmedge.runtimes.embedder import Embedder
from mmedge.runtimes.pipeline import Pipeline
from mmedge.runtimes.sampling import GenerationOptions

__all__ = ["Pipeline", "Embedder", "GenerationOptions"]
