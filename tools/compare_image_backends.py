"""PIL vs torchvision backends of Qwen2VLImageProcessor: the max abs difference of pixel_values (same grids).

Needs an environment where torchvision imports (not the CPU torch of the test venv), e.g.
    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0
    /tmp/tvenv/bin/python tools/compare_image_backends.py
The figures are in docs/dynamic-resolution.md.
"""
import numpy as np
from PIL import Image
from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil
rng = np.random.default_rng(0)
y, x = np.mgrid[0:480, 0:640]
photo = np.stack([(x * 255 // 640), (y * 255 // 480), ((x + y) % 256)], -1).astype(np.uint8)
images = {
    "noise 70x50": Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)),
    "gradient 640x480": Image.fromarray(photo),
    "wide 200x40": Image.fromarray(np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (40, 1))).convert("RGB"),
    "photo-like 1000x700 (noisy gradient)": Image.fromarray(np.clip(np.array(Image.fromarray(photo).resize((1000, 700))).astype(int) + rng.integers(-20, 20, (700, 1000, 3)), 0, 255).astype(np.uint8)),
}
for name, kw in [("Qwen2-VL defaults (patch 14, 56*56..28*28*1280)", {}),
                 ("tiny (patch 4, 256..4096)", dict(patch_size=4, min_pixels=256, max_pixels=4096))]:
    tv, pil = Qwen2VLImageProcessor(**kw), Qwen2VLImageProcessorPil(**kw)
    print(name, type(tv).__name__, "vs", type(pil).__name__)
    for label, im in images.items():
        a = tv(images=im, return_tensors="np"); b = pil(images=im, return_tensors="np")
        same_grid = (a["image_grid_thw"] == b["image_grid_thw"]).all()
        d = np.abs(a["pixel_values"] - b["pixel_values"])
        print(f"  {label}: grid {b['image_grid_thw'].tolist()} equal={same_grid}; max abs {d.max():.4f}, mean {d.mean():.5f}, share > 0.01: {(d > 0.01).mean():.3%}")
