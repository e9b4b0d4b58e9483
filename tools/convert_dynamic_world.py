"""Convert Google's Dynamic World SavedModel to geoseg's bundle (safetensors weights + card + licence).

    python tools/convert_dynamic_world.py [--saved-model DIR] [--tf-python PY] [--out DIR]

Runs in geoseg's environment (torch, no TensorFlow). It starts ``--tf-python`` (an interpreter that has
``tensorflow``; default /tmp/tfvenv/bin/python) on this same file with ``--dump``, which reads the
SavedModel's variables and runs it once on a random input; then it maps the variables onto
``DynamicWorldNet``, checks the torch output against the SavedModel's, and writes
``geoseg/models/weights/dynamic_world/{weights.safetensors,card.yaml,LICENSE,NOTICE}``.

The layer mapping below was read from the SavedModel's graph (``serving_default``; op inputs traced by
hand): Keras layer names -> DynamicWorldNet module paths.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SAVED_MODEL = ROOT.parent / "shared" / "data" / "dynamic_world" / "model" / "forward"
DEFAULT_OUT = ROOT / "geoseg" / "models" / "weights" / "dynamic_world"
DEFAULT_TF_PYTHON = "/tmp/tfvenv/bin/python"

# torch module path -> (Keras conv layer, Keras batch-norm layer or None). "dw" marks a depthwise conv.
LAYERS: dict[str, tuple[str, str | None]] = {
    "stem": ("conv2d", "batch_normalization"),
    "side.0": ("conv2d_1", "batch_normalization_1"),
    "side.1": ("depthwise_conv2d", "batch_normalization_2"),
    # block1: conv2d_2, dw_1, conv2d_3, dw_2, conv2d_4, dw_3 (bn 3..8); shortcut conv2d_5 / bn 9
    "block1.main.0": ("conv2d_2", "batch_normalization_3"),
    "block1.main.1": ("depthwise_conv2d_1", "batch_normalization_4"),
    "block1.main.2": ("conv2d_3", "batch_normalization_5"),
    "block1.main.3": ("depthwise_conv2d_2", "batch_normalization_6"),
    "block1.main.4": ("conv2d_4", "batch_normalization_7"),
    "block1.main.5": ("depthwise_conv2d_3", "batch_normalization_8"),
    "block1.shortcut": ("conv2d_5", "batch_normalization_9"),
    "block2.main.0": ("conv2d_6", "batch_normalization_10"),
    "block2.main.1": ("depthwise_conv2d_4", "batch_normalization_11"),
    "block2.main.2": ("conv2d_7", "batch_normalization_12"),
    "block2.main.3": ("depthwise_conv2d_5", "batch_normalization_13"),
    "block2.main.4": ("conv2d_8", "batch_normalization_14"),
    "block2.main.5": ("depthwise_conv2d_6", "batch_normalization_15"),
    "block2.shortcut": ("conv2d_9", "batch_normalization_16"),
    "block3.main.0": ("conv2d_10", "batch_normalization_17"),
    "block3.main.1": ("depthwise_conv2d_7", "batch_normalization_18"),
    "block3.main.2": ("conv2d_11", "batch_normalization_19"),
    "block3.main.3": ("depthwise_conv2d_8", "batch_normalization_20"),
    "block3.main.4": ("conv2d_12", "batch_normalization_21"),
    "block3.main.5": ("depthwise_conv2d_9", "batch_normalization_22"),
    "block3.shortcut": ("conv2d_13", "batch_normalization_23"),
    "head": ("conv2d_14", None),
}

NOTICE = """\
Dynamic World model weights, converted to safetensors for geoseg.

Source: the Dynamic World land-use / land-cover model (TensorFlow SavedModel, forward path),
github.com/google/dynamicworld; Brown, C.F. et al. (2022), "Dynamic World, Near real-time global 10 m land
use land cover mapping", Scientific Data 9:251. Licensed under the Apache License, Version 2.0 (see LICENSE).

Required attribution: This code is produced for the Dynamic World Project by Google in partnership with
National Geographic and the World Resources Institute.

Modifications: the weights were copied unchanged (re-laid out from TensorFlow's HWIO to PyTorch's OIHW) by
tools/convert_dynamic_world.py in geoseg; the network is re-implemented in geoseg/models/dynamic_world.py.
"""


def dump(saved_model: Path, out: Path) -> None:
    """[TensorFlow side] Write the SavedModel's variables and one check input/output pair to ``out`` (.npz)."""
    import tensorflow as tf

    model = tf.saved_model.load(str(saved_model))
    fn = model.signatures["serving_default"]
    arrays = {v.name.removesuffix(":0"): v.numpy() for v in model.variables}
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=(1, 96, 128, 9)).astype(np.float32)  # normalised inputs lie in (0, 1)
    (y,) = fn(input_3=tf.constant(x)).values()
    arrays["__check_input__"], arrays["__check_output__"] = x, y.numpy()
    np.savez(out, **arrays)


def to_state_dict(tf_vars: dict[str, np.ndarray]) -> dict:
    """Map Keras variables onto DynamicWorldNet's state_dict (HWIO -> OIHW, depthwise HWC1 -> C1HW)."""
    import torch

    sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for path, (conv, bn) in LAYERS.items():
        prefix = f"{path}.conv" if bn else path
        if conv.startswith("depthwise"):
            kernel = tf_vars[f"{conv}/depthwise_kernel"].transpose(2, 3, 0, 1)
            used.add(f"{conv}/depthwise_kernel")
        else:
            kernel = tf_vars[f"{conv}/kernel"].transpose(3, 2, 0, 1)
            used.add(f"{conv}/kernel")
        sd[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel))
        sd[f"{prefix}.bias"] = torch.from_numpy(tf_vars[f"{conv}/bias"])
        used.add(f"{conv}/bias")
        if bn:
            for tf_name, torch_name in [
                ("gamma", "weight"),
                ("beta", "bias"),
                ("moving_mean", "running_mean"),
                ("moving_variance", "running_var"),
            ]:
                sd[f"{path}.bn.{torch_name}"] = torch.from_numpy(tf_vars[f"{bn}/{tf_name}"])
                used.add(f"{bn}/{tf_name}")
            sd[f"{path}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    unused = {k for k in tf_vars if not k.startswith("__")} - used
    if unused:
        raise SystemExit(f"SavedModel variables not mapped: {sorted(unused)}")
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}


def dynamic_world_card():  # -> geoseg.models.ModelCard (imported late: the --dump side has no torch)
    """The model card shipped with the converted weights."""
    from geoseg.models.card import ModelCard

    percentiles = [
        [1.7417268007636313, 2.023298706048351],
        [1.7261204997060209, 2.038905204308012],
        [1.6798346251414997, 2.179592821212937],
        [1.7734969472909623, 2.2890068333026603],
        [2.289154079164943, 2.6171674549378166],
        [2.382939712192371, 2.773418590375327],
        [2.3828939530384052, 2.7578332604178284],
        [2.1952484264967844, 2.789092484314204],
        [1.554812948247501, 2.4140534947492487],
    ]
    classes = [
        ("water", "#419BDF"),
        ("trees", "#397D49"),
        ("grass", "#88B053"),
        ("flooded_vegetation", "#7A87C6"),
        ("crops", "#E49635"),
        ("shrub_and_scrub", "#DFC35A"),
        ("built", "#C4281B"),
        ("bare", "#A59B8F"),
        ("snow_and_ice", "#B39FE1"),
    ]
    return ModelCard(
        name="dynamic-world",
        version="1.0",
        architecture="dynamic_world",
        arch_params={"in_channels": 9, "num_classes": 9},
        bands=["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B11", "B12"],
        input_dtype="Sentinel-2 L1C TOA reflectance x 10000 (int16 or float), all bands resampled to 10 m",
        normalization={"name": "dynamic_world_log_sigmoid", "params": {"percentiles": percentiles}},
        gsd_m=10.0,
        classes=[{"id": i, "name": n, "color": c} for i, (n, c) in enumerate(classes)],
        output_stride=2,
        # Measured: tiles with >= 22 px of halo equal whole-image inference bit for bit (see
        # tests/test_dynamic_world.py); 32 keeps a margin and a multiple of the stride.
        halo_px=32,
        license="Apache-2.0",
        attribution=(
            "Produced for the Dynamic World Project by Google in partnership with National Geographic and the "
            "World Resources Institute (Brown et al. 2022, Scientific Data 9:251)."
        ),
        description=(
            "Dynamic World near-real-time global land-use / land-cover model (9 classes) from Sentinel-2 L1C, "
            "ported to PyTorch from Google's SavedModel (github.com/google/dynamicworld)."
        ),
    )


def convert(saved_model: Path, tf_python: str, out: Path) -> None:
    """[geoseg side] Dump with TensorFlow in a subprocess, map, verify, write the bundle."""
    import torch

    sys.path.insert(0, str(ROOT))
    from geoseg.models.dynamic_world import DynamicWorldNet
    from geoseg.models.registry import load_model, save_bundle

    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "dw_vars.npz"
        cmd = [tf_python, __file__, "--dump", "--saved-model", str(saved_model), "--npz", str(npz)]
        subprocess.run(cmd, check=True)
        with np.load(npz) as f:
            tf_vars = {k: f[k] for k in f.files}
    net = DynamicWorldNet()
    net.load_state_dict(to_state_dict(tf_vars), strict=True)
    net.eval()
    with torch.inference_mode():
        y = net(torch.from_numpy(tf_vars["__check_input__"]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    ref = tf_vars["__check_output__"]
    diff = float(np.abs(y - ref).max())
    agree = float((y.argmax(-1) == ref.argmax(-1)).mean())
    print(f"torch vs SavedModel on a random 96x128 input: max |diff| {diff:.3g}, argmax agreement {agree:.4%}")
    if diff > 1e-3:
        raise SystemExit("conversion check failed: torch output differs from the SavedModel's")

    out.mkdir(parents=True, exist_ok=True)
    save_bundle(net, dynamic_world_card(), out)
    shutil.copyfile(saved_model.parent.parent / "LICENSE", out / "LICENSE")
    (out / "NOTICE").write_text(NOTICE, encoding="utf-8")
    load_model(out)  # the bundle must load through the normal path
    print(f"wrote {out}: " + ", ".join(f"{p.name} ({p.stat().st_size} B)" for p in sorted(out.iterdir())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--saved-model", type=Path, default=DEFAULT_SAVED_MODEL)
    ap.add_argument("--tf-python", default=DEFAULT_TF_PYTHON, help="an interpreter with tensorflow installed")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)  # TensorFlow side (subprocess)
    ap.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dump:
        dump(args.saved_model, args.npz)
    else:
        convert(args.saved_model, args.tf_python, args.out)


if __name__ == "__main__":
    main()
