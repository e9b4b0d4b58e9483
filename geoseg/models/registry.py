"""The model registry and the bundle format.

A *bundle* is a directory (or a .zip / .tar[.gz] archive of one) holding ``card.yaml`` (a ``ModelCard``)
and ``weights.safetensors`` (or ``weights.pt``, read with ``torch.load(weights_only=True)``). Loading never
unpickles code. Registered pretrained models are bundles shipped in ``geoseg/models/weights/``.

Plain dicts, no import side effects: ``ARCHITECTURES`` maps an architecture name to its ``nn.Module``
class, ``PRETRAINED`` a model name to its bundle directory.
"""

from __future__ import annotations

import math
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from geoseg.errors import ModelError
from geoseg.models.card import ModelCard
from geoseg.models.deeplab import DeepLabV3Plus
from geoseg.models.dynamic_world import DynamicWorldNet
from geoseg.models.unet import UNet

__all__ = [
    "ARCHITECTURES",
    "PRETRAINED",
    "GeoModel",
    "list_models",
    "get_model",
    "load_model",
    "save_bundle",
    "narrow_state_dict",
    "CARD_FILE",
    "WEIGHTS_FILE",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CARD_FILE = "card.yaml"
WEIGHTS_FILE = "weights.safetensors"
WEIGHTS_PT_FILE = "weights.pt"

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "dynamic_world": DynamicWorldNet,
    "unet": UNet,
    "deeplabv3plus": DeepLabV3Plus,
}

PRETRAINED: dict[str, Path] = {
    "dynamic-world": WEIGHTS_DIR / "dynamic_world",
    "buildings": WEIGHTS_DIR / "buildings",  # RGB aerial 0.05-0.5 m, trained by configs/train_buildings.yaml
    # the same imagery, one polygon per building (card.instances; configs/train_buildings_instances.yaml)
    "buildings-instances": WEIGHTS_DIR / "buildings_instances",
}

_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


@dataclass(frozen=True)
class GeoModel:
    """A loaded model: its card and its module (eval mode, float32, CPU, no grad).

    Calling convention: ``logits = m.module(m.card.normalization.apply(x))`` with ``x`` float32 NCHW holding
    ``len(m.card.bands)`` raw bands; logits are N x num_classes x H x W (H, W multiples of output_stride).
    """

    card: ModelCard
    module: nn.Module


def list_models() -> list[str]:
    """Names of the registered pretrained models."""
    return sorted(PRETRAINED)


def get_model(architecture: str, **arch_params) -> nn.Module:
    """An untrained module of ``architecture`` built with ``arch_params``."""
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        raise ModelError(
            f"unknown architecture {architecture!r}; known architectures: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    try:
        return cls(**arch_params)
    except (TypeError, ValueError) as e:
        raise ModelError(f"architecture {architecture!r} rejects arch_params {arch_params}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# loading


def _find_bundle_root(directory: Path, source: str) -> Path:
    """The directory holding card.yaml: ``directory`` itself or its only subdirectory (archives of a folder)."""
    if (directory / CARD_FILE).is_file():
        return directory
    subdirs = [p for p in directory.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / CARD_FILE).is_file():
        return subdirs[0]
    raise ModelError(f"{source}: not a model bundle: no {CARD_FILE} (a bundle holds {CARD_FILE} + {WEIGHTS_FILE})")


def _extract(archive: Path, into: Path) -> None:
    """Unpack a bundle archive, refusing members that would land outside ``into``."""
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    target = (into / name).resolve()
                    if not target.is_relative_to(into.resolve()):
                        raise ModelError(f"{archive}: archive member {name!r} points outside the bundle")
                zf.extractall(into)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(into, filter="data")  # 'data' refuses links out, absolute paths and devices
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise ModelError(f"{archive}: cannot unpack model bundle archive: {e}") from None


def _read_state_dict(directory: Path, source: str) -> tuple[dict[str, torch.Tensor], Path]:
    """Tensors from weights.safetensors (preferred) or weights.pt; never unpickles code."""
    st, pt = directory / WEIGHTS_FILE, directory / WEIGHTS_PT_FILE
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st, device="cpu"), st
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"{st}: corrupt weights file: {e}") from None
    if pt.is_file():
        try:
            sd = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types; all mean the same here
            raise ModelError(f"{pt}: corrupt or unsafe weights file (weights_only load failed): {e}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ModelError(f"{pt}: weights must be a flat dict of tensor name -> tensor (a state_dict)")
        return sd, pt
    raise ModelError(f"{source}: missing weights: neither {WEIGHTS_FILE} nor {WEIGHTS_PT_FILE} in {directory}")


def _check_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Raise a ModelError naming the first tensors that are missing, unexpected or mis-shaped."""
    expected = module.state_dict()
    # BatchNorm's step counter is training bookkeeping; bundles from other tools may omit it.
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        (k, tuple(expected[k].shape), tuple(sd[k].shape))
        for k in expected
        if k in sd and expected[k].shape != sd[k].shape
    ]
    problems = []
    if wrong:
        problems.append(
            "shape mismatch: "
            + "; ".join(f"tensor '{k}' expected {e} got {g}" for k, e, g in wrong[:5])
            + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else "")
        )
    if missing:
        problems.append(f"missing tensors {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected[:5]}" + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        )
    if problems:
        raise ModelError(f"{path}: weights do not fit architecture {arch!r}: " + "; ".join(problems))
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelError(f"{path}: corrupt weights: tensor '{k}' has non-finite values")


def _check_io(module: nn.Module, card: ModelCard, source: str) -> None:
    """One tiny forward pass: the module must take len(card.bands) bands and give card.num_classes maps."""
    side = card.output_stride * math.ceil(32 / card.output_stride)
    x = torch.zeros(1, len(card.bands), side, side)
    try:
        with torch.inference_mode():
            y = module(x)
    except RuntimeError as e:
        raise ModelError(
            f"{source}: the module does not accept {len(card.bands)} input bands {card.bands}: {e}"
        ) from None
    if tuple(y.shape) != (1, card.num_classes, side, side):
        raise ModelError(
            f"{source}: module output is {tuple(y.shape)} for a {side}x{side} input; the card expects "
            f"{card.num_classes} classes at the input's size"
        )


def _load_bundle_dir(directory: Path, source: str) -> GeoModel:
    directory = _find_bundle_root(directory, source)
    card = ModelCard.from_yaml(directory / CARD_FILE)
    if card.architecture not in ARCHITECTURES:
        raise ModelError(
            f"{directory / CARD_FILE}: field 'architecture': unknown architecture {card.architecture!r}; "
            f"known architectures: {', '.join(sorted(ARCHITECTURES))}"
        )
    try:
        module = ARCHITECTURES[card.architecture](**card.arch_params)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{directory / CARD_FILE}: field 'arch_params': {e}") from None
    sd, wpath = _read_state_dict(directory, source)
    _check_state_dict(module, sd, wpath, card.architecture)
    module.load_state_dict(sd, strict=False)  # strictness checked above, with better messages
    module = module.to(device="cpu", dtype=torch.float32).eval().requires_grad_(False)
    _check_io(module, card, str(directory))
    return GeoModel(card=card, module=module)


def load_model(name_or_path: str | Path) -> GeoModel:
    """Load a registered model by name (see ``list_models()``) or a bundle by path (directory or archive)."""
    if isinstance(name_or_path, str) and name_or_path in PRETRAINED:
        directory = PRETRAINED[name_or_path]
        if not directory.is_dir():
            raise ModelError(f"model {name_or_path!r}: bundle directory {directory} is missing from the install")
        return _load_bundle_dir(directory, f"model {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _load_bundle_dir(path, str(path))
    if path.is_file() and path.name.lower().endswith(_ARCHIVE_SUFFIXES):
        with tempfile.TemporaryDirectory(prefix="geoseg-bundle-") as tmp:
            _extract(path, Path(tmp))
            return _load_bundle_dir(Path(tmp), str(path))  # weights are in memory before tmp goes
    if path.exists():
        raise ModelError(
            f"{path}: not a model bundle: give a directory with {CARD_FILE} + {WEIGHTS_FILE}, "
            f"or an archive ({', '.join(_ARCHIVE_SUFFIXES)}) of one"
        )
    raise ModelError(
        f"unknown model {str(name_or_path)!r}: known models: {', '.join(list_models())}; "
        f"or give the path of a bundle directory ({CARD_FILE} + {WEIGHTS_FILE})"
    )


def narrow_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``sd`` with each floating-point tensor in ``dtype`` where every value fits (finite after the cast); a tensor
    that does not fit (a BatchNorm running variance past float16's 65504) stays as it is."""
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            narrow = v.to(dtype)
            v = narrow if bool(torch.isfinite(narrow).all()) else v
        out[k] = v
    return out


def save_bundle(module: nn.Module, card: ModelCard, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``module``'s weights and ``card`` as a bundle directory that ``load_model`` reads back.

    ``dtype`` (e.g. ``torch.float16``) stores the floating-point tensors in it where they fit
    (``narrow_state_dict``): half the file; they load as float32.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    reference = get_model(card.architecture, **card.arch_params)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    if dtype is not None:
        sd = narrow_state_dict(sd, dtype)
    _check_state_dict(reference, sd, directory, card.architecture)
    directory.mkdir(parents=True, exist_ok=True)
    card.to_yaml(directory / CARD_FILE)
    # one metadata key only: safetensors writes a multi-key map in random order (non-reproducible bytes)
    save_file(sd, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory
