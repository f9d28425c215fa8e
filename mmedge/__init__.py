"""mmedge: vision-language models on edge devices.

    import mmedge
    pipe = mmedge.Pipeline.load("package-dir/")
    print(pipe.generate("photo.jpg", "caption en"))

    emb = mmedge.Embedder.load("clip-package/")   # CLIP, SigLIP
    print(emb.classify("photo.jpg", ["cup", "dog"]))

Importing mmedge does not import torch; only `mmedge export` needs it.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("Pipeline", "Embedder", "GenerationOptions"):
        from mmedge import runtimes

        return getattr(runtimes, name)
    if name in ("MmedgeError", "InputError", "PackageError", "ExportError"):
        from mmedge import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'mmedge' has no attribute {name!r}")


__all__ = ["Pipeline", "Embedder", "GenerationOptions", "MmedgeError", "InputError", "PackageError", "ExportError", "__version__"]
