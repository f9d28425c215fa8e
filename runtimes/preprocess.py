"""Image loading and preprocessing in Pillow + numpy.

Reproduces the Hugging Face image processors the families use (resize with
Pillow's filter, rescale in float64 then float32, normalize), so the vision
encoder sees the same pixel values as in transformers. Accepts a path, encoded
image bytes, a PIL image or an HxW(x3/4) uint8 array (files and bytes turned
upright by their EXIF orientation); grayscale, palette, alpha and 16-bit
images are converted to 8-bit RGB (alpha composited onto white, as
transformers does).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmedge.errors import InputError, PackageError
from mmedge.manifest import PreprocessSpec

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# transformers stores PILImageResampling as an int in preprocessor configs
RESAMPLE_FROM_INT = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def check_spec(spec: PreprocessSpec | None) -> None:
    """What a package's preprocessing names is known here: checked as it loads, not at its first image."""
    if spec is None:
        return
    if spec.resample not in RESAMPLE:
        raise PackageError(f"the package's preprocess.resample is {spec.resample!r}, not one of {', '.join(RESAMPLE)}; "
                           "re-export the package")
    if len(spec.mean) != 3 or len(spec.std) != 3:
        raise PackageError(f"the package's preprocess.mean and std hold {len(spec.mean)} and {len(spec.std)} values, "
                           "not one per channel (3); re-export the package")
    if not all(value > 0 for value in spec.std):
        raise PackageError(f"the package's preprocess.std is {spec.std}: each must be > 0 (pixels are divided by "
                           "it); re-export the package")


def load_image(image: ImageInput) -> Image.Image:
    """Open an image from a path, encoded bytes, a PIL image or an array; errors are one clear line.

    Files and bytes are turned upright by their EXIF orientation tag (as transformers' image loading does);
    a PIL image or an array is taken as given, already upright.
    """
    if isinstance(image, Image.Image):
        return _checked_size(image, "image")
    if isinstance(image, np.ndarray):
        return _checked_size(_from_array(image), "image array")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(image)), "the image bytes")
    if isinstance(image, (str, os.PathLike)):
        if str(image).startswith(("http://", "https://")):
            raise InputError(f"{image} is a URL; mmedge reads local files: download the image first")
        path = Path(image)
        if not path.exists():
            raise InputError(f"image not found: {path}")
        if path.is_dir():
            raise InputError(f"{path} is a directory; pass an image file")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path} cannot be read (permission denied)")
        return _open(path, str(path))
    raise InputError(f"unsupported image type {type(image).__name__}; pass a path, image bytes, a PIL image or "
                     "an HxWx3 uint8 array")


def _open(source, what: str) -> Image.Image:
    """Decode a file or bytes and turn it upright, holding one full-size copy of the pixels (a 48-megapixel photo
    is 144 MB of RGB): the file is ours to close, and the EXIF rotation is applied in place."""
    try:
        with open(source, "rb") if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source) as f:
            upright = Image.open(f)
            upright.load()
        ImageOps.exif_transpose(upright, in_place=True)
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image Pillow can read (PNG, JPEG, WebP, BMP, ...)") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{what} is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{what} is a damaged or truncated image ({exc})") from None
    return _checked_size(upright, what)


def _checked_size(image: Image.Image, what: str) -> Image.Image:
    if image.width < 1 or image.height < 1:
        raise InputError(f"{what} is empty ({image.width}x{image.height} pixels)")
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8, got {array.dtype}; convert with .astype(np.uint8)")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array)
    raise InputError(f"image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer grayscale: scale to 8 bits instead of clipping.
        data = np.asarray(image).astype(np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or data.max() > 255 else 255.0
        image = Image.fromarray(np.clip(data / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        data = np.asarray(image, dtype=np.float64)
        lo, hi = float(data.min()), float(data.max())
        data = (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
        image = Image.fromarray((data * 255.0 + 0.5).astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _resized(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int]:
    """(width, height) after resizing, as the transformers image processors compute it."""
    if spec.resize_mode == "exact":
        return spec.width, spec.height
    if spec.resize_mode == "shortest_edge":
        width, height = size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
        if Image.MAX_IMAGE_PIXELS and new_short * new_long > Image.MAX_IMAGE_PIXELS:  # 200000 x 1 -> 12,800,000 x 64
            raise InputError(f"a {width} x {height} image is too narrow for this package: resized to "
                             f"{spec.shortest_edge} pixels on its short side it would be {new_long:,} long; crop it "
                             "nearer to a square")
        return (new_short, new_long) if width <= height else (new_long, new_short)
    raise PackageError(f"this mmedge does not know the resize mode {spec.resize_mode!r}; upgrade mmedge")


def _center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre height x width of an HxWxC array; zero-padded first where the image is smaller."""
    h, w = arr.shape[:2]
    if h < height or w < width:
        top_pad, left_pad = -(-(max(h, height) - h) // 2), -(-(max(w, width) - w) // 2)
        padded = np.zeros((max(h, height), max(w, width), arr.shape[2]), arr.dtype)
        padded[top_pad:top_pad + h, left_pad:left_pad + w] = arr
        arr, h, w = padded, *padded.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return arr[top:top + height, left:left + width]


def preprocess(image: ImageInput, spec: PreprocessSpec) -> np.ndarray:
    """Image -> pixel_values [N, 3, H, W] float32 (N = 1, or the tiles + global image when splitting)."""
    return preprocess_with_grid(image, spec)[0]


def preprocess_with_grid(image: ImageInput, spec: PreprocessSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """pixel_values and the (rows, cols) of tiles they hold ((0, 0): one whole image, no tiles)."""
    img = load_image(image)
    if spec.convert_rgb:
        img = to_rgb(img)
    if spec.resize_mode == "smart_resize":
        return _patches(img, spec)
    if spec.resize_mode == "tile_canvas":
        return _tile_canvas(img, spec)
    if spec.resize_mode == "longest_edge":
        frames, grid = _tiles(img, spec)
    elif spec.resize_mode == "aspect_tiles":
        frames, grid = _aspect_tiles(img, spec)
    else:
        if spec.do_resize:
            size = _resized(img.size, spec)
            if img.size != size:
                img = img.resize(size, resample=RESAMPLE[spec.resample])
        arr = rgb_array(img)
        frames, grid = [_center_crop(arr, spec.height, spec.width) if spec.do_center_crop else arr], (0, 0)
    return np.ascontiguousarray(np.stack([normalized(f, spec) for f in frames])), grid


def rgb_array(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def normalized(arr: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32, rescaled in float64 then normalized in float32 as transformers does."""
    pixels = arr.astype(np.float64)
    if spec.do_rescale:
        pixels = pixels * spec.rescale
    pixels = pixels.astype(np.float32)
    if spec.do_normalize:
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        pixels = (pixels - mean) / std
    return pixels.transpose(2, 0, 1)


def _tiles(img: Image.Image, spec: PreprocessSpec) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Idefics3 / SmolVLM: longest edge to `longest_edge`, then either one square of `tile_size` (no
    splitting) or tiles of tile_size x tile_size, row by row, followed by the whole image squashed to one
    tile. Every resize is Pillow's filter on 8-bit RGB, with the processor's own rounding."""
    resample = RESAMPLE[spec.resample]
    tile = spec.tile_size

    def resize(im, h, w):
        return im if im.size == (w, h) else im.resize((w, h), resample=resample)

    if spec.do_resize:
        img = resize(img, *_longest_edge_size(img.height, img.width, spec.longest_edge))
    if not spec.do_image_splitting:
        return [rgb_array(resize(img, tile, tile))], (0, 0)
    h, w = img.height, img.width
    ratio = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / ratio) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * ratio) / tile) * tile
    img = resize(img, h, w)
    if h <= tile and w <= tile:
        return [rgb_array(img)], (0, 0)
    rows, cols = h // tile, w // tile
    arr = rgb_array(img)
    frames = [arr[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    frames.append(rgb_array(resize(img, tile, tile)))
    return frames, (rows, cols)


def tile_grid(height: int, width: int, tile: int, low: int, high: int) -> tuple[int, int]:
    """(columns, rows) for "aspect_tiles": among the grids of low..high tiles, fewest tiles first, the one whose
    aspect ratio is closest to the image's; on a tie the later (more tiles) one while the image's area is more
    than half the tiles' (GotOcr2ImageProcessor's get_optimal_tiled_canvas)."""
    grids = sorted(((c, r) for c in range(1, high + 1) for r in range(1, high + 1) if low <= c * r <= high),
                   key=lambda g: g[0] * g[1])
    ratio, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(ratio - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def _aspect_tiles(img: Image.Image, spec: PreprocessSpec) -> tuple[list[np.ndarray], tuple[int, int]]:
    """InternVL / GOT-OCR2: the image resized to the grid of `tile_grid`, cut into tiles row by row, and with more
    than one tile the whole image resized to a last one; without splitting, one tile-sized square. Pillow's
    filter on 8-bit RGB, as the processor's PIL backend resizes."""
    resample = RESAMPLE[spec.resample]
    tile = spec.tile_size

    def resize(im, h, w):
        return im if im.size == (w, h) else im.resize((w, h), resample=resample)

    if not spec.do_image_splitting:
        return [rgb_array(resize(img, tile, tile) if spec.do_resize else img)], (0, 0)
    cols, rows = tile_grid(img.height, img.width, tile, spec.min_tiles or 1, spec.max_tiles or 1)
    if cols * rows == 1:
        return [rgb_array(resize(img, tile, tile))], (0, 0)
    arr = rgb_array(resize(img, rows * tile, cols * tile))
    frames = [arr[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    frames.append(rgb_array(resize(img, tile, tile)))
    return frames, (rows, cols)


def tiled_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(height, width) of the canvas of tiles for "tile_canvas", as MllamaImageProcessor picks it: among every
    arrangement of at most max_tiles tiles, the smallest scale-up that fits the image whole, else the largest
    scale-down; on a tie the smallest area."""
    sizes = np.array([(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1)
                      if a * b <= max_tiles]) * tile
    scale_h, scale_w = sizes[:, 0] / height, sizes[:, 1] / width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)
    up = scales[scales >= 1]
    chosen = sizes[scales == (np.min(up) if len(up) else np.max(scales[scales < 1]))]
    best = chosen[np.argmin(chosen[:, 0] * chosen[:, 1])]
    return int(best[0]), int(best[1])


def _fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """(height, width) of the image resized into its canvas, aspect kept, no side under one tile unless the image's
    is (MllamaImageProcessor's get_image_size_fit_to_canvas)."""
    target_w, target_h = int(np.clip(width, tile, canvas_w)), int(np.clip(height, tile, canvas_h))
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def _tile_canvas(img: Image.Image, spec: PreprocessSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """Llama 3.2 Vision: the image resized into the canvas of `tiled_canvas` (Pillow's filter on 8-bit RGB), padded
    with black at the right and bottom, normalized, cut into tiles row by row, and padded with empty (zero) tiles
    to max_tiles: pixel_values [max_tiles, 3, tile, tile] and the (rows, cols) of tiles."""
    tile, most = spec.tile_size, spec.max_tiles
    canvas_h, canvas_w = tiled_canvas(img.height, img.width, most, tile)
    h, w = _fit_to_canvas(img.height, img.width, canvas_h, canvas_w, tile)
    if img.size != (w, h):
        img = img.resize((w, h), resample=RESAMPLE[spec.resample])
    canvas = np.zeros((canvas_h, canvas_w, 3), np.uint8)
    canvas[:h, :w] = rgb_array(img)
    rows, cols = canvas_h // tile, canvas_w // tile
    pixels = normalized(canvas, spec).reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4)
    out = np.zeros((most, 3, tile, tile), np.float32)
    out[: rows * cols] = pixels.reshape(rows * cols, 3, tile, tile)
    return out, (rows, cols)


def smart_resize(height: int, width: int, spec: PreprocessSpec, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) as Qwen2-VL's processors resize: each a multiple of patch x merge, the area within
    [min_pixels, max_pixels] (the package's, unless given), the aspect ratio kept as closely as that allows; with
    `smart_resize_frames` / `smart_resize_upscale`, GLM-4V's variant."""
    factor = spec.patch_size * spec.merge_size
    low = spec.min_pixels if min_pixels is None else min_pixels
    high = spec.max_pixels if max_pixels is None else max_pixels
    frames = spec.smart_resize_frames  # GLM-4V counts an image as its temporal patch's frames
    if spec.smart_resize_upscale and (height < factor or width < factor):
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"the image is {width}x{height}: an aspect ratio over 200 is more than the model takes; "
                         "crop it first")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if frames * h * w > high:
        beta = math.sqrt(frames * height * width / high)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif frames * h * w < low:
        beta = math.sqrt(low / (frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _patches(img: Image.Image, spec: PreprocessSpec, frames: int = 1) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Qwen2-VL: smart_resize, normalize, then patches [t*h*w, 3*T*p*p] in the processor's order (merge blocks
    of m x m patches row by row; each patch channel-major, the image repeated over the T frames of a temporal
    patch) and the grid (t, h, w) in patches."""
    if spec.do_resize:
        h, w = smart_resize(img.height, img.width, spec)
        if img.size != (w, h):
            img = img.resize((w, h), resample=RESAMPLE[spec.resample])
    arr = normalized(rgb_array(img), spec)  # [3, H, W]
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    c, height, width = arr.shape
    gh, gw = height // p, width // p
    patches = arr.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p)), (1, gh, gw)


def _longest_edge_size(h: int, w: int, longest: int, limit: int = 4096) -> tuple[int, int]:
    """(height, width) with the longer side `longest`, the other truncated and rounded up to even; at most `limit`."""
    ratio = w / h
    if w >= h:
        w = longest
        h = int(w / ratio)
        h += h % 2
    else:
        h = longest
        w = int(h * ratio)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    ratio = w / h
    if w >= h and w > limit:
        w, h = limit, int(limit / ratio)
    elif h > w and h > limit:
        h, w = limit, int(limit * ratio)
    return max(h, 1), max(w, 1)
