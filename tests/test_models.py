"""Registry, model card and bundle format; U-Net and DeepLabv3+ shapes."""

from __future__ import annotations

import copy
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from geoseg.errors import ModelError
from geoseg.models import ClassInfo, GeoModel, ModelCard, Normalization, get_model, list_models, load_model, save_bundle
from geoseg.models.registry import ARCHITECTURES, PRETRAINED


def _card(**overrides) -> ModelCard:
    """A small U-Net card: 5 bands, 3 classes."""
    data = dict(
        name="toy-unet",
        version="0.1",
        architecture="unet",
        arch_params={"in_channels": 5, "num_classes": 3, "base_channels": 4, "depth": 2},
        bands=["B1", "B2", "B3", "B4", "B5"],
        input_dtype="uint16 DN",
        normalization={"name": "scale", "params": {"factor": 1e-4}},
        gsd_m=10.0,
        classes=[
            {"id": 0, "name": "water", "color": "#419BDF"},
            {"id": 1, "name": "trees", "color": "#397d49"},
            {"id": 2, "name": "built", "color": "#C4281B"},
        ],
        output_stride=4,
        halo_px=16,
        license="CC0-1.0",
        attribution="test",
    )
    data.update(overrides)
    return ModelCard(**data)


@pytest.fixture()
def bundle(tmp_path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    card = _card()
    module = get_model(card.architecture, **card.arch_params).eval()
    return save_bundle(module, card, tmp_path / "toy"), module


# ---------------------------------------------------------------------------------------------------------
# registry and the shipped Dynamic World bundle


def test_registry_is_plain_dicts():
    assert set(ARCHITECTURES) == {"dynamic_world", "unet", "deeplabv3plus"}
    assert list_models() == ["buildings", "buildings-instances", "dynamic-world"]
    assert PRETRAINED["dynamic-world"].joinpath("weights.safetensors").stat().st_size < 2_000_000


def test_dynamic_world_card_and_module():
    m = load_model("dynamic-world")
    assert isinstance(m, GeoModel)
    card = m.card
    assert card.bands == ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B11", "B12"]
    assert (card.gsd_m, card.output_stride, card.halo_px) == (10.0, 2, 32)
    assert card.class_names == [
        "water",
        "trees",
        "grass",
        "flooded_vegetation",
        "crops",
        "shrub_and_scrub",
        "built",
        "bare",
        "snow_and_ice",
    ]
    assert card.num_classes == 9
    assert card.palette[0] == (0x41, 0x9B, 0xDF, 255) and card.palette[8] == (0xB3, 0x9F, 0xE1, 255)
    assert card.normalization.name == "dynamic_world_log_sigmoid"
    assert card.license == "Apache-2.0" and "National Geographic" in card.attribution
    assert not m.module.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in m.module.parameters())
    bundle_dir = PRETRAINED["dynamic-world"]
    assert "Apache License" in (bundle_dir / "LICENSE").read_text()
    assert "World Resources Institute" in (bundle_dir / "NOTICE").read_text()


def test_get_model_unknown_architecture():
    with pytest.raises(ModelError, match="unknown architecture 'resnet'.*deeplabv3plus, dynamic_world, unet"):
        get_model("resnet")
    with pytest.raises(ModelError, match="rejects arch_params"):
        get_model("unet", colour="blue")


@pytest.mark.parametrize("arch", ["unet", "unet-input-stride-2", "deeplabv3plus"])
@pytest.mark.parametrize("size", [(64, 64), (50, 70)])
def test_trainable_architectures_shapes(arch, size):
    params = {"in_channels": 5, "num_classes": 7, "base_channels": 4}
    if arch.startswith("unet"):
        params["depth"] = 3
        if arch == "unet-input-stride-2":
            arch, params["input_stride"] = "unet", 2
    net = get_model(arch, **params)
    y = net(torch.rand(2, 5, *size))  # train mode: gradients flow
    assert y.shape == (2, 7, *size)
    y.mean().backward()
    with torch.inference_mode():
        assert net.eval()(torch.rand(1, 5, *size)).shape == (1, 7, *size)
    assert net.output_stride == (16 if params.get("input_stride") == 2 else 8 if arch == "unet" else 16)


def test_unet_input_stride_sees_the_input_averaged_and_checks_its_value():
    torch.manual_seed(0)
    net = get_model("unet", in_channels=3, num_classes=2, base_channels=4, depth=2, input_stride=2).eval()
    x = torch.rand(1, 3, 32, 32)
    # a pattern that averages away over 2 x 2 pixels changes nothing: the network runs on the averaged input
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 0.2 - 0.1
    with torch.inference_mode():
        assert torch.allclose(net(x), net(x + checker), atol=1e-5)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="input_stride must be a power of 2"):
            get_model("unet", input_stride=bad)


# ---------------------------------------------------------------------------------------------------------
# bundles


def test_bundle_round_trip(bundle):
    directory, module = bundle
    assert sorted(p.name for p in directory.iterdir()) == ["card.yaml", "weights.safetensors"]
    m = load_model(directory)
    assert m.card == _card()
    x = torch.rand(1, 5, 32, 32)
    with torch.inference_mode():
        assert torch.equal(m.module(x), module(x))
    assert load_model(str(directory)).card.name == "toy-unet"


def test_float16_bundle_is_half_the_file_and_loads_as_the_rounded_float32_module(bundle, tmp_path):
    directory, module = bundle
    half = save_bundle(module, _card(), tmp_path / "half", dtype=torch.float16)
    full_size, half_size = (directory / "weights.safetensors").stat().st_size, (half / "weights.safetensors").stat().st_size
    assert half_size < 0.6 * full_size
    m = load_model(half)
    rounded = get_model(m.card.architecture, **m.card.arch_params).eval()
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in module.state_dict().items()})
    assert all(p.dtype == torch.float32 for p in m.module.parameters())
    x = torch.rand(1, 5, 32, 32)
    with torch.inference_mode():
        assert torch.equal(m.module(x), rounded(x))
    # a tensor past float16's range (a BatchNorm variance of 1e6) stays float32 instead of turning inf
    from safetensors.torch import load_file

    from geoseg.models import narrow_state_dict

    big = copy.deepcopy(module)
    name = next(k for k in big.state_dict() if k.endswith("running_var"))
    big.state_dict()[name][0] = 1e6
    stored = load_file(save_bundle(big, _card(), tmp_path / "big", dtype=torch.float16) / "weights.safetensors")
    assert stored[name].dtype == torch.float32 and stored[name][0] == 1e6
    assert {v.dtype for k, v in stored.items() if k != name and v.is_floating_point()} == {torch.float16}
    assert load_model(tmp_path / "big").module.state_dict()[name][0] == 1e6
    assert narrow_state_dict({"a": torch.tensor([7e4])}, torch.float16)["a"].dtype == torch.float32


@pytest.mark.parametrize("fmt", ["zip", "gztar"])
def test_bundle_archive(bundle, tmp_path, fmt):
    directory, _ = bundle
    archive = shutil.make_archive(str(tmp_path / "toy-archive"), fmt, root_dir=directory.parent, base_dir="toy")
    assert load_model(archive).card.name == "toy-unet"


def test_unknown_model_name_lists_known():
    with pytest.raises(ModelError, match="unknown model 'dynamic-wrld'.*dynamic-world"):
        load_model("dynamic-wrld")


def test_not_a_bundle(tmp_path):
    with pytest.raises(ModelError, match="no card.yaml"):
        load_model(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a model bundle"):
        load_model(tmp_path / "x.txt")


def test_missing_weights(bundle):
    directory, _ = bundle
    (directory / "weights.safetensors").unlink()
    with pytest.raises(ModelError, match="missing weights"):
        load_model(directory)


def test_corrupt_weights(bundle):
    directory, _ = bundle
    (directory / "weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelError, match="corrupt weights"):
        load_model(directory)
    (directory / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="corrupt weights"):
        load_model(directory)


def test_non_finite_weights(bundle):
    directory, _ = bundle
    sd = load_file(directory / "weights.safetensors")
    sd["head.bias"][0] = float("nan")
    save_file(sd, directory / "weights.safetensors")
    with pytest.raises(ModelError, match="'head.bias' has non-finite"):
        load_model(directory)


def test_shape_mismatch_names_tensor(bundle):
    directory, _ = bundle
    sd = load_file(directory / "weights.safetensors")
    sd["head.weight"] = torch.zeros(4, 4, 1, 1)
    save_file(sd, directory / "weights.safetensors")
    with pytest.raises(ModelError, match=r"tensor 'head.weight' expected \(3, 4, 1, 1\) got \(4, 4, 1, 1\)"):
        load_model(directory)


def test_missing_and_unexpected_tensors(bundle):
    directory, _ = bundle
    sd = load_file(directory / "weights.safetensors")
    del sd["head.bias"]
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, directory / "weights.safetensors")
    with pytest.raises(ModelError, match=r"missing tensors \['head.bias'\].*unexpected tensors \['extra.weight'\]"):
        load_model(directory)


def test_card_disagrees_with_module(bundle):
    """A card listing 4 bands for a 5-band network fails at load with a clear message."""
    directory, _ = bundle
    data = yaml.safe_load((directory / "card.yaml").read_text())
    data["bands"] = ["B1", "B2", "B3", "B4"]
    data["normalization"] = {"name": "identity", "params": {}}
    (directory / "card.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ModelError, match="does not accept 4 input bands"):
        load_model(directory)


def test_pt_weights_are_loaded_without_code(bundle):
    directory, module = bundle
    st = directory / "weights.safetensors"
    torch.save(load_file(st), directory / "weights.pt")
    st.unlink()
    x = torch.rand(1, 5, 16, 16)
    with torch.inference_mode():
        assert torch.equal(load_model(directory).module(x), module(x))
    # a pickle that would run code on load is refused
    (directory / "weights.pt").write_bytes(pickle.dumps({"w": _Evil()}, protocol=2))
    with pytest.raises(ModelError, match="weights_only"):
        load_model(directory)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.pop("halo_px"), "halo_px"),
        (lambda d: d.update(halo_px=-1), "halo_px"),
        (lambda d: d.update(output_stride=0), "output_stride"),
        (lambda d: d.update(gsd_m="ten"), "gsd_m"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["classes"][1].update(color="green"), "classes.1.color"),
        (lambda d: d["classes"][1].update(id=0), "duplicate class ids"),
        (lambda d: d["classes"][1].update(id=255), "class ids must be < 255"),
        (lambda d: d["normalization"].update(name="minmax"), "normalization"),
        (lambda d: d["normalization"].update(params={"factor": [1, 2]}), "2 entries for 5 bands"),
    ],
)
def test_bad_card_names_file_and_field(bundle, edit, field):
    directory, _ = bundle
    path = directory / "card.yaml"
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ModelError) as err:
        load_model(directory)
    assert str(path) in str(err.value) and field in str(err.value)


def test_card_not_yaml(bundle):
    directory, _ = bundle
    (directory / "card.yaml").write_text("name: [unclosed")
    with pytest.raises(ModelError, match="card.yaml: model card is not valid YAML"):
        load_model(directory)
    (directory / "card.yaml").write_text("- a list\n")
    with pytest.raises(ModelError, match="must be a mapping"):
        load_model(directory)


def test_card_yaml_round_trip_and_properties(tmp_path):
    card = _card()
    card.to_yaml(tmp_path / "card.yaml")
    assert ModelCard.from_yaml(tmp_path / "card.yaml") == card
    assert card.classes[1].color == "#397D49"  # normalised to upper case
    assert card.palette == {0: (65, 155, 223, 255), 1: (57, 125, 73, 255), 2: (196, 40, 27, 255)}
    assert card.class_names == ["water", "trees", "built"] and card.num_classes == 3
    with pytest.raises(ValidationError, match="frozen"):
        card.halo_px = 3
    with pytest.raises(ModelError, match="model card not found"):
        ModelCard.from_yaml(tmp_path / "nope.yaml")


def test_save_bundle_refuses_mismatched_module(tmp_path):
    with pytest.raises(ModelError, match="shape mismatch"):
        save_bundle(get_model("unet", in_channels=3, num_classes=3, base_channels=4, depth=2), _card(), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# normalisations


def test_normalization_unknown_name_lists_valid():
    with pytest.raises(ModelError, match="unknown normalization 'minmax'.*dynamic_world_log_sigmoid.*identity"):
        Normalization(name="minmax")
    with pytest.raises(ModelError, match="missing \\['std'\\]"):
        Normalization(name="standardize", params={"mean": 1.0})


def test_normalizations_apply():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert torch.equal(Normalization(name="identity").apply(x), x)
    y = Normalization(name="scale", params={"factor": [1.0, 2.0, 0.5], "offset": 1.0}).apply(x)
    assert torch.equal(y[:, 1], x[:, 1] * 2 + 1)
    y = Normalization(name="standardize", params={"mean": [0.0, 1.0, 2.0], "std": 2.0}).apply(x)
    assert torch.allclose(y[:, 2], (x[:, 2] - 2) / 2)
    with pytest.raises(ModelError, match="3 values for 2 bands"):
        Normalization(name="scale", params={"factor": [1.0, 2.0, 0.5]}).apply(x[:, :2])


def test_dynamic_world_normalization_formula_and_locality():
    norm = load_model("dynamic-world").card.normalization
    torch.manual_seed(0)
    x = torch.randint(0, 10000, (1, 9, 37, 41)).float()
    p = torch.tensor(norm.params["percentiles"], dtype=torch.float64)
    e = torch.exp(((torch.log(x.double() * 0.005 + 1) - p[:, 0, None, None]) / p[:, 1, None, None]) * 5 - 1)
    assert torch.allclose(norm.apply(x).double(), e / (e + 1), atol=1e-6)
    # per pixel only: a crop of the normalised image is the normalised crop, bit for bit
    assert torch.equal(norm.apply(x)[..., 5:30, 3:22], norm.apply(x[..., 5:30, 3:22].contiguous()))


def test_class_info_validation():
    assert ClassInfo(id=3, name="x", color="#a0b0c0").color == "#A0B0C0"
    with pytest.raises(ModelError, match="ClassInfo: .*field 'color'"):
        ClassInfo(id=3, name="x", color="red")
    with pytest.raises(ModelError, match="field 'id'"):
        ClassInfo(id=-1, name="x", color="#000000")
