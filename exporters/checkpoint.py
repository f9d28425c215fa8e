"""Finding and checking a Hugging Face checkpoint: a local directory, an alias or a Hub id."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmedge.errors import ExportError, first_line
from mmedge.exporters.family import aliases, families, family_for

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model")  # spiece.model: SigLIP's SentencePiece


def shipped_dir() -> Path:
    """Where trained demo checkpoints ship: mmedge/models/<name>/ inside the installed package."""
    import mmedge

    return Path(mmedge.__file__).resolve().parent / "models"


def shipped_models() -> dict[str, Path]:
    root = shipped_dir()
    if not root.is_dir():
        return {}
    return {d.name: d for d in sorted(root.iterdir()) if (d / "config.json").exists()}


def builtin_models() -> dict[str, str]:
    """Models mmedge has without a download: trained demo models it ships, tiny random ones it builds."""
    from mmedge.exporters import tiny

    out = {name: f"trained demo model, shipped ({path})" for name, path in shipped_models().items()}
    out.update({name: tiny.builtin_shape(name).description for name in tiny.BUILTIN})
    return out


def resolve(model: str) -> Path:
    """Return the local checkpoint directory for `model`, or raise one clear line."""
    from mmedge.exporters import tiny

    path = Path(model).expanduser()
    if path.exists():
        return check_checkpoint(path)
    shipped = shipped_models()
    if model in shipped:
        return check_checkpoint(shipped[model])
    if model in tiny.BUILTIN:
        return tiny.materialize(model)
    hub_id = aliases().get(model, model)
    if "/" not in hub_id or model.startswith((".", "/", "~")):
        known = ", ".join(sorted([*aliases(), *shipped, *tiny.BUILTIN]))
        raise ExportError(
            f"model {model!r} is not a directory, a known alias ({known}) or a Hugging Face id (org/name)"
        )
    return check_checkpoint(_from_hub(model, hub_id))


def _from_hub(model: str, hub_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    named = f"{model!r} ({hub_id})" if model != hub_id else repr(hub_id)
    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(hub_id))
        except Exception as exc:
            reason = first_line(exc)
    raise ExportError(
        f"model {named} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and could not be "
        f"downloaded ({reason}); download it where there is network, or pass a local checkpoint "
        f"directory: --model /path/to/checkpoint"
    )


def read_config(checkpoint: Path) -> dict:
    path = checkpoint / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{checkpoint} is not a Hugging Face checkpoint (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc})") from None


def check_checkpoint(checkpoint: Path) -> Path:
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint} is a file; pass the checkpoint directory (the one with config.json)")
    config = read_config(checkpoint)
    model_type = config.get("model_type")
    if not model_type:
        raise ExportError(f"{checkpoint / 'config.json'} has no model_type; is this a transformers checkpoint?")
    if family_for(model_type) is None:
        supported = ", ".join(sorted(families()))
        raise ExportError(f"model type {model_type!r} is not supported yet; supported: {supported}")
    if not any(next(checkpoint.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ExportError(f"{checkpoint} has no weights (*.safetensors or pytorch_model.bin); the download is incomplete")
    if not any((checkpoint / name).exists() for name in TOKENIZER_FILES):
        raise ExportError(f"{checkpoint} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    image_processor_config(checkpoint)
    _check_named_files(checkpoint)
    return checkpoint


def _check_named_files(checkpoint: Path) -> None:
    """Weight shards an index names must lie inside the checkpoint (symlinks resolved), as a package's files must:
    a checkpoint someone sent must not make export read files elsewhere on the machine."""
    root = checkpoint.resolve()
    for index in sorted(checkpoint.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ExportError(f"{index} is not a valid weight index ({first_line(exc)})") from None
        for shard in sorted(shards):
            path = (root / str(shard)).resolve()
            if not path.is_relative_to(root):
                raise ExportError(f"{index.name} names the weight file {shard!r}, outside the checkpoint {checkpoint}; "
                                  "refusing to read it")


def image_processor_config(checkpoint: Path) -> dict:
    """The image processor's settings: preprocessor_config.json, or the newer processor_config.json."""
    legacy = checkpoint / "preprocessor_config.json"
    if legacy.exists():
        return json.loads(legacy.read_text())
    combined = checkpoint / "processor_config.json"
    if combined.exists():
        data = json.loads(combined.read_text())
        if isinstance(data.get("image_processor"), dict):
            return data["image_processor"]
    raise ExportError(
        f"{checkpoint} has no image processor settings (preprocessor_config.json or processor_config.json)"
    )


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def pixel_fields(pre: dict, resample: int = 3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> dict:
    """The PreprocessSpec fields every image processor config states the same way: resampling filter, rescale
    factor, mean and std, RGB conversion and the do_* switches; the defaults are the processor class's, for a
    config that leaves them out."""
    from mmedge.runtimes.preprocess import RESAMPLE_FROM_INT

    resample = pre.get("resample", resample)
    return dict(resample=RESAMPLE_FROM_INT.get(resample, resample) if isinstance(resample, int) else resample,
                rescale=pre.get("rescale_factor", 1 / 255), mean=list(pre.get("image_mean", mean)),
                std=list(pre.get("image_std", std)), convert_rgb=pre.get("do_convert_rgb", True) is not False,
                do_resize=pre.get("do_resize", True), do_rescale=pre.get("do_rescale", True),
                do_normalize=pre.get("do_normalize", True))


def processor_config(checkpoint: Path) -> dict:
    """The processor's own settings (patch size, image token, ...) from processor_config.json, or {}."""
    path = checkpoint / "processor_config.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if not isinstance(v, dict)}


def chat_template(checkpoint: Path) -> str | None:
    """The checkpoint's chat template (Jinja source), wherever transformers saved it, or None."""
    jinja = checkpoint / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = checkpoint / name
        if path.exists():
            template = json.loads(path.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None
