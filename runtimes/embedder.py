"""Image and text embeddings from a dual-encoder package (kind "embedding": CLIP, SigLIP), and zero-shot
classification with them.

    emb = Embedder.load("clip-int8-onnxruntime")
    emb.embed_images(["a.jpg", "b.jpg"])          # [2, dim] float32, unit length
    emb.embed_texts(["a cup", "a dog"])            # [2, dim]
    emb.classify("frame.jpg", ["cup", "dog", "cat"])   # [("cup", 0.91), ("dog", 0.06), ...]

Images and texts run in batches of the package's max_batch. classify writes each label into the template
("a photo of a {}." by default), and turns the logits (logit_scale x cosine + logit_bias) into probabilities
the model's own way: a softmax over the labels (CLIP), or a sigmoid for each (SigLIP, whose probabilities
need not sum to one).
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Sequence

import numpy as np

from mmedge.errors import InputError, PackageError
from mmedge.manifest import Manifest, load_manifest
from mmedge.runtimes.backends import load_graphs, open_engine
from mmedge.runtimes.preprocess import ImageInput, check_spec, preprocess
from mmedge.runtimes.text import checked_text

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str, scheme: str | None) -> str:
    """A text as the package's tokenizer expects it written: as given, or "siglip" (lowercased, punctuation
    removed, runs of whitespace made one space, stripped: SiglipTokenizer.canonicalize_text)."""
    if scheme == "siglip":
        return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()
    return text


class Embedder:
    def __init__(self, path: Path, manifest: Manifest, graphs: dict, tokenizer):
        self.path, self.manifest, self.graphs = path, manifest, graphs
        self.spec = manifest.embedding
        self.tokenizer = tokenizer
        self._label_cache: dict[str, np.ndarray] = {}  # classify's text embeddings, by text
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.spec.text_length)  # the end token the post-processor adds is kept

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None, providers: Sequence[str] | None = None,
             threads: int = 0, verify: bool | str = True, device: str | None = None,
             inference_precision: str | None = None, model_cache: bool = True) -> "Embedder":
        """Open an embedding package written by `mmedge export` (options as Pipeline.load's)."""
        from tokenizers import Tokenizer

        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"the package is a folder's path (str or Path), not {type(path).__name__}")
        path = Path(path)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise InputError(f"threads must be a whole number >= 0 (0: the engine's choice), got {threads!r}")
        manifest = load_manifest(path, verify_files=verify)
        if manifest.kind != "embedding":
            raise PackageError(f"{path} is a {manifest.kind} package ({manifest.model_type}), not an embedding one: "
                               "open it with mmedge.Pipeline.load (CLI: mmedge run)")
        check_spec(manifest.preprocess)
        try:
            template_field(manifest.embedding.template)
        except InputError as exc:
            raise PackageError(f"the package's embedding.template: {exc}; re-export the package") from None
        missing = [p for p in ("vision_encoder", "text_encoder") if p not in manifest.graphs]
        if missing:
            raise PackageError(f"package {path} lacks the graphs {', '.join(missing)}; re-export it")
        engine = open_engine(path, manifest, backend, threads=threads, providers=providers, device=device,
                             inference_precision=inference_precision, model_cache=model_cache)
        graphs = load_graphs(engine, path, manifest, ("vision_encoder", "text_encoder"))
        try:
            tokenizer = Tokenizer.from_file(str(path / manifest.tokenizer))
        except Exception as exc:
            raise PackageError(f"cannot read {manifest.tokenizer}: {exc}") from None
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if manifest.embedding.pad_id >= vocab:
            raise PackageError(f"the package's embedding.pad_id {manifest.embedding.pad_id} is not a token of its "
                               f"tokenizer ({vocab} tokens); re-export the package")
        return cls(path, manifest, graphs, tokenizer)

    # -- embeddings ---------------------------------------------------------------------------

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """[N, dim] unit-length image embeddings, one row per image (a path, bytes, PIL image or HxWx3 array)."""
        images = _sequence(images, "images")
        rows = []
        for start in range(0, len(images), self.spec.max_batch):
            pixels = np.concatenate([preprocess(im, self.manifest.preprocess)
                                     for im in images[start:start + self.spec.max_batch]])
            rows.append(self.graphs["vision_encoder"].run({"pixel_values": pixels})["image_embeds"])
        return np.concatenate(rows).astype(np.float32, copy=False) if rows else np.zeros((0, self.spec.dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, dim] unit-length text embeddings, one row per text."""
        texts = _texts(texts)
        rows = []
        for start in range(0, len(texts), self.spec.max_batch):
            ids = self.token_ids(texts[start:start + self.spec.max_batch])
            rows.append(self.graphs["text_encoder"].run({"input_ids": ids})["text_embeds"])
        return np.concatenate(rows).astype(np.float32, copy=False) if rows else np.zeros((0, self.spec.dim), np.float32)

    def token_ids(self, texts: Sequence[str]) -> np.ndarray:
        """input_ids [N, S] as the checkpoint's processor makes them: truncated to text_length, padded with
        pad_id to the longest text (or, "max_length", to text_length)."""
        texts = _texts(texts)
        if not texts:
            return np.zeros((0, self.spec.text_length if self.spec.text_padding == "max_length" else 0), np.int64)
        encoded = [e.ids for e in self.tokenizer.encode_batch([normalize_text(t, self.spec.text_normalize)
                                                              for t in texts])]
        width = self.spec.text_length if self.spec.text_padding == "max_length" else max(map(len, encoded))
        ids = np.full((len(encoded), width), self.spec.pad_id, dtype=np.int64)
        for row, e in enumerate(encoded):
            ids[row, :len(e)] = e
        return ids

    def _label_embeddings(self, texts: list[str]) -> np.ndarray:
        """embed_texts(texts), each text embedded once while it stays among the last LABEL_CACHE texts asked about:
        classifying frame after frame against the same labels runs the text encoder once."""
        cache = self._label_cache
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        rows = dict(zip(new, self.embed_texts(new))) if new else {}
        out = np.stack([rows[t] if t in rows else cache[t] for t in texts])  # read before any is evicted
        cache.update(rows)
        while len(cache) > LABEL_CACHE:  # the oldest go (more labels than it holds in one call: this call's too)
            cache.pop(next(iter(cache)))
        return out

    # -- scores -------------------------------------------------------------------------------

    def logits(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """[images, texts] logit_scale x cosine + logit_bias, as the model's logits_per_image."""
        image_embeds, text_embeds = self._rows(image_embeds, "image_embeds"), self._rows(text_embeds, "text_embeds")
        return self.spec.logit_scale * (image_embeds @ text_embeds.T) + self.spec.logit_bias

    def _rows(self, embeds, what: str) -> np.ndarray:
        """`embeds` as [N, dim] numbers, as embed_images / embed_texts return them."""
        try:
            rows = np.asarray(embeds, dtype=np.float32)
        except (TypeError, ValueError):
            rows = None
        if rows is None or rows.ndim != 2 or rows.shape[1] != self.spec.dim:
            shape = "x".join(map(str, rows.shape)) if rows is not None else type(embeds).__name__
            raise InputError(f"{what} must be [N, {self.spec.dim}] embeddings as embed_images / embed_texts return "
                             f"them, got {shape}")
        return rows

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Each row's logits as the model turns them into probabilities: softmax over the row, or sigmoid each."""
        try:
            logits = np.asarray(logits, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"logits must be numbers, [images, texts] as logits() returns them, got "
                             f"{type(logits).__name__}") from None
        if logits.ndim == 0:
            raise InputError("logits must be [images, texts] (or one row of texts) as logits() returns them, "
                             "got a single number")
        if logits.shape[-1] == 0:  # no texts
            return logits
        if self.spec.activation == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)

    def classify(self, image: ImageInput, labels: Sequence[str], template: str | None = None
                 ) -> list[tuple[str, float]]:
        """(label, probability) for each label, most probable first; each label is written into `template`
        (default: the package's, e.g. "a photo of a {}.") before it is embedded."""
        labels = _sequence(labels, "labels")
        if not labels:
            raise InputError("classify needs at least one label")
        for label in labels:
            checked_text(label, "each label")
        if len(set(labels)) < len(labels):
            seen: set = set()
            twice = next(lb for lb in labels if lb in seen or seen.add(lb))
            raise InputError(f"the label {twice!r} is given more than once (the probability would be split between "
                             "its copies)")
        template = self.spec.template if template is None else template
        template_field(template)
        probs = self.probabilities(self.logits(self.embed_images([image]),
                                               self._label_embeddings([template.format(lb) for lb in labels])))[0]
        order = np.argsort(-probs, kind="stable")
        return [(labels[i], float(probs[i])) for i in order]


def template_field(template) -> None:
    """That `template` holds exactly one `{}` (no name, index, conversion or format) and is otherwise text that
    str.format writes as it is."""
    if not isinstance(template, str):
        raise InputError(f"the template must be text with {{}} where the label goes, got {type(template).__name__}")
    checked_text(template, "the template")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise InputError(f"the template {template!r} is not a format string: {exc}") from None
    if fields != [("", "", None)]:
        raise InputError(f"the template must contain {{}} once, where the label goes (no other braces: write {{{{ }}}} "
                         f"for a literal one), got {template!r}")


LABEL_CACHE = 4096  # label texts whose embeddings classify keeps (a robot asks about the same labels every frame)


def _sequence(items, what: str) -> list:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InputError(f"{what} must be a list, got {type(items).__name__}")
    return list(items)


def _texts(texts) -> list[str]:
    texts = _sequence(texts, "texts")
    for t in texts:
        checked_text(t, "each text")
    return texts
