"""Reading and writing the demo's weight files (safetensors, float32, with metadata).

``demo/weights/unet_<prediction>.safetensors`` holds the UNet (``unet.*``) and its class encoder
(``encoder.*``); ``demo/weights/classifier.safetensors`` the digit classifier. The metadata
records what a file is (prediction type, schedule, sizes, training seed and steps).
"""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import load_file, safe_open, save_file

from d2f_core import normalize_prediction

from .classifier import DigitClassifier
from .model import ClassEncoder, TinyUNet, UNetConfig

_META_KEY = "diff2flow_demo"
WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"


def unet_path(prediction: str, folder: str | pathlib.Path = WEIGHTS_DIR) -> pathlib.Path:
    return pathlib.Path(folder) / f"unet_{normalize_prediction(prediction)}.safetensors"


def classifier_path(folder: str | pathlib.Path = WEIGHTS_DIR) -> pathlib.Path:
    return pathlib.Path(folder) / "classifier.safetensors"


def _contiguous(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().float().contiguous() for k, v in module.state_dict().items()}


def save_unet(path: str | pathlib.Path, unet: TinyUNet, encoder: ClassEncoder, metadata: dict) -> None:
    tensors = {**_contiguous(unet, "unet."), **_contiguous(encoder, "encoder.")}
    meta = {k: str(v) for k, v in metadata.items()}
    meta["config"] = json.dumps(unet.config.to_dict(), sort_keys=True)
    _save(tensors, path, meta)


def _save(tensors: dict[str, torch.Tensor], path: str | pathlib.Path, metadata: dict[str, str]) -> None:
    # One metadata entry holding sorted JSON: safetensors writes several entries in hash-map
    # order, which would make two identical trainings give files that differ byte-wise.
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(metadata, sort_keys=True)})


def read_metadata(path: str | pathlib.Path) -> dict[str, str]:
    """The metadata a demo weight file was written with (empty for foreign files)."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
    return json.loads(raw) if raw else {}


def _missing(path: pathlib.Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} weights not found at {path}: run `python -m demo.pretrain` to create them")


def load_unet(
    prediction: str, folder: str | pathlib.Path = WEIGHTS_DIR
) -> tuple[TinyUNet, ClassEncoder, dict[str, str]]:
    """``(unet, encoder, metadata)`` for ``prediction`` ("eps" or "v"), frozen, in eval mode."""
    path = unet_path(prediction, folder)
    if not path.is_file():
        raise _missing(path, f"the {prediction}-prediction UNet")
    meta = read_metadata(path)
    if meta.get("prediction") != normalize_prediction(prediction):
        raise ValueError(f"{path} holds a {meta.get('prediction')!r}-prediction model, not {prediction!r}")
    config = UNetConfig(**json.loads(meta["config"]))
    unet, encoder = TinyUNet(config), ClassEncoder(config)
    tensors = load_file(str(path))
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")})
    for module in (unet, encoder):
        module.eval().requires_grad_(False)
    return unet, encoder, meta


def save_classifier(path: str | pathlib.Path, classifier: DigitClassifier, metadata: dict) -> None:
    _save(_contiguous(classifier, ""), path, {k: str(v) for k, v in metadata.items()})


def load_classifier(folder: str | pathlib.Path = WEIGHTS_DIR) -> DigitClassifier:
    path = classifier_path(folder)
    if not path.is_file():
        raise _missing(path, "the digit classifier")
    net = DigitClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)
