"""Fine-tuning (train.init_from), the weight average (train.ema_decay) and test-time augmentation (model.tta).

Real data: area2 chips of ../shared/data/buildings and the shipped ``buildings`` model; bundles built here are
written to tmp_path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from geoseg.config import config_from_dict
from geoseg.errors import ConfigError
from geoseg.infer import TTA_VIEWS, Predictor
from geoseg.models import get_model, load_model, save_bundle
from geoseg.models.card import ModelCard
from geoseg.train.driver import prepare_plan
from geoseg.train.loop import (
    IGNORE, confusion_matrix, iou_from_confusion, lovasz_softmax, segmentation_loss, weight_average,
)
from tests.conftest import SHARED_DATA, _require

VAL = SHARED_DATA / "buildings" / "area2" / "val"
TRAIN = SHARED_DATA / "buildings" / "area2" / "train"
CLASSES = [{"id": 0, "name": "background", "color": "#000000"}, {"id": 1, "name": "building", "color": "#FF0000"}]
ARCH = {"base_channels": 4, "depth": 2}


def _sources(n=2):
    imgs = sorted(_require(TRAIN / "images").glob("*.tif"))[:n]
    vals = sorted(_require(VAL / "images").glob("*.tif"))[:1]
    return [{"kind": "rasters", "images": [str(p) for p in imgs], "labels": str(TRAIN / "masks" / "{stem}.mask.tif"),
             "split": "train"},
            {"kind": "rasters", "images": [str(p) for p in vals], "labels": str(VAL / "masks" / "{stem}.mask.tif"),
             "split": "val"}]


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory) -> Path:
    """A small U-Net bundle with RGB bands, two classes, its own normalisation and declared logit offsets."""
    torch.manual_seed(3)
    module = get_model("unet", in_channels=3, num_classes=2, **ARCH)
    with torch.no_grad():
        module.head.bias.copy_(torch.tensor([0.25, 2.0]))
    card = ModelCard(
        name="base", version="1", architecture="unet", arch_params={"in_channels": 3, "num_classes": 2, **ARCH},
        bands=["red", "green", "blue"], input_dtype="uint8",
        normalization={"name": "standardize", "params": {"mean": [100.0, 110.0, 90.0], "std": [40.0, 41.0, 42.0]}},
        gsd_m=0.15, gsd_range_m=(0.05, 0.5), classes=CLASSES, output_stride=4, halo_px=16, license="test",
        attribution="test", logit_offsets=[0.0, 1.5],
    )
    return save_bundle(module, card, tmp_path_factory.mktemp("finetune") / "base")


def _cfg(base, **train):
    t = {"classes": CLASSES, "sources": _sources(), "band_names": ["red", "green", "blue"], "chip_px": 64,
         "arch_params": ARCH, "init_from": str(base)}
    t.update(train)
    return config_from_dict({"train": t})


def test_init_from_starts_from_the_bundles_trained_logits_and_normalisation(base_bundle):
    plan = prepare_plan(_cfg(base_bundle))
    base = load_model(base_bundle)
    sd = plan["init_state"]
    for k, v in base.module.state_dict().items():
        if k != "head.bias":
            assert torch.equal(sd[k], v.float()), k
    # the card's offsets (logit adjustment folded in at training) come out, so training sees its own logits
    assert torch.allclose(sd["head.bias"], torch.tensor([0.25, 0.5]))
    assert plan["mean"] == [100.0, 110.0, 90.0] and plan["std"] == [40.0, 41.0, 42.0]
    # a run from scratch on the same data computes its own statistics and has another checkpoint fingerprint
    scratch = prepare_plan(_cfg(base_bundle, init_from=None))
    assert scratch["init_state"] is None and scratch["mean"] != plan["mean"]
    assert scratch["fingerprint"] != plan["fingerprint"]


@pytest.mark.parametrize("change,message", [
    ({"architecture": "deeplabv3plus", "arch_params": {}}, r"architecture 'unet', but train.architecture is "
                                                           r"'deeplabv3plus'"),
    ({"arch_params": {"base_channels": 8, "depth": 2}}, r"arch_params \{'base_channels': 4, 'depth': 2\}, but"),
    ({"band_names": ["r", "g", "b"]}, r"bands \['red', 'green', 'blue'\], but the training images give"),
    ({"classes": [{"id": 0, "name": "other"}, {"id": 1, "name": "building"}]},
     r"classes \['background', 'building'\], but train.classes is \['other', 'building'\]"),
])
def test_init_from_refuses_a_bundle_that_does_not_fit(base_bundle, change, message):
    with pytest.raises(ConfigError, match=r"train.init_from '.*base': " + message):
        prepare_plan(_cfg(base_bundle, **change))


def test_init_from_an_unknown_model_names_the_known_ones(tmp_path):
    with pytest.raises(Exception, match=r"unknown model 'no-such-model'.*buildings"):
        prepare_plan(_cfg("no-such-model"))


def test_card_logit_offsets_are_checked_and_left_out_when_absent(base_bundle):
    card = load_model(base_bundle).card
    assert card.logit_offsets == [0.0, 1.5]
    with pytest.raises(ValueError, match="logit_offsets: 3 values for 2 classes"):
        ModelCard.model_validate({**card.model_dump(), "logit_offsets": [0, 1, 2]})
    plain = card.model_copy(update={"logit_offsets": None}).model_dump()
    assert "logit_offsets" not in plain and "tta" not in plain
    shipped = load_model("buildings").card  # the head bias of the shipped model holds its logit adjustment
    assert shipped.logit_offsets is not None and shipped.logit_offsets[0] == 0 and shipped.logit_offsets[1] > 1


def test_weight_average_is_an_ema_of_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    ema = weight_average(m, 0.9)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    expect = None
    for step in range(5):
        m.train()
        loss = m(torch.randn(2, 3, 8, 8) + step).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(m)
        now = {k: v.detach().clone().float() for k, v in m.state_dict().items() if v.is_floating_point()}
        expect = now if expect is None else {k: 0.9 * expect[k] + 0.1 * now[k] for k in now}
    got = ema.module.state_dict()
    for k, v in expect.items():  # parameters and BatchNorm running statistics alike
        assert torch.allclose(got[k].float(), v, atol=1e-6), k
    assert not torch.allclose(got["1.running_mean"], m.state_dict()["1.running_mean"])


def _iou(pred: torch.Tensor, target: torch.Tensor, c: int) -> float:
    return float(iou_from_confusion(confusion_matrix(pred, target, 3))[c])  # IGNORE truth is skipped


def test_lovasz_softmax_is_one_minus_iou_for_hard_predictions_and_ignores_unlabelled_pixels():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 32, 32), generator=g)
    target[target == 2] = 1
    target[0, :5] = IGNORE
    pred = torch.randint(0, 3, (2, 32, 32), generator=g)
    probs = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    # class 2 is absent from the labels: only classes 0 and 1 count, as in the mean IoU over present classes
    expect = 1 - (_iou(pred, target, 0) + _iou(pred, target, 1)) / 2
    assert float(lovasz_softmax(probs, target)) == pytest.approx(expect, abs=1e-6)
    other = probs.clone()
    other[0, :, :5] = other[0, :, :5].roll(1, dims=0)  # other predictions where the labels are IGNORE
    assert float(lovasz_softmax(other, target)) == pytest.approx(expect, abs=1e-6)
    labelled = target.clone()
    labelled[0, :5] = 0  # the same pixels labelled: now they count
    assert float(lovasz_softmax(other, labelled)) != pytest.approx(float(lovasz_softmax(probs, labelled)), abs=1e-4)


def test_ce_lovasz_training_steps_raise_the_iou_of_a_wrong_model():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    target = (x[:, 0] + 0.5 * x[:, 1] > 0.8).long()  # a minority class a 1x1 convolution can learn
    model = torch.nn.Conv2d(3, 2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = _iou(model(x).argmax(1), target, 1)
    for _ in range(60):
        loss = segmentation_loss(model(x), target, "ce_lovasz")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _iou(model(x).argmax(1), target, 1) > max(before, 0.8)
    assert config_from_dict({"train": {"loss": "ce_lovasz"}}).train.loss == "ce_lovasz"


# ---------------------------------------------------------------------------------------------------------
# test-time augmentation


def test_tta_averages_each_views_probabilities_on_the_tiles_pixels(base_bundle):
    model = load_model(base_bundle)
    rng = np.random.default_rng(0)
    batch = rng.uniform(0, 255, (2, 3, 32, 48)).astype(np.float32)  # not square: turned views swap the sides
    for mode in ("flips", "d4"):
        pred = Predictor(model, "cpu", tta=mode)
        classes, conf = pred.forward(batch, confidence=True)
        x = model.card.normalization.apply(torch.from_numpy(batch))
        acc = torch.zeros(2, 2, 32, 48)
        for turns, flip in TTA_VIEWS[mode]:
            v = torch.rot90(x, turns, dims=(2, 3))
            v = v.flip(3) if flip else v
            with torch.no_grad():
                p = model.module(v).softmax(1)
            acc += torch.rot90(p.flip(3) if flip else p, -turns, dims=(2, 3))
        acc /= len(TTA_VIEWS[mode])
        assert np.array_equal(classes, acc.argmax(1).numpy())
        assert np.abs(conf.astype(int) - np.round(acc.amax(1).numpy() * 254)).max() <= 1
        assert pred.model_calls == 1
    plain = Predictor(model, "cpu").forward(batch, confidence=True)[1]
    assert not np.array_equal(plain, Predictor(model, "cpu", tta="d4").forward(batch, confidence=True)[1])


def test_tta_default_comes_from_the_card_and_bad_modes_are_refused(base_bundle):
    model = load_model(base_bundle)
    assert Predictor(model, "cpu").tta == "none"
    with_tta = type(model)(card=model.card.model_copy(update={"tta": "flips"}), module=model.module)
    assert Predictor(with_tta, "cpu").tta == "flips"
    assert Predictor(with_tta, "cpu", tta="none").tta == "none"
    with pytest.raises(ConfigError, match=r"model.tta 'rot': not one of none, flips, d4"):
        Predictor(model, "cpu", tta="rot")
    with pytest.raises(ConfigError, match=r"model.tta"):
        config_from_dict({"model": {"tta": "rot"}})


@pytest.mark.slow
def test_tta_mask_does_not_depend_on_the_block_size(tmp_path):
    """d4 on the shipped buildings model, a real zoom-21 chip cut into 64 px tiles by 64 and 256 px blocks."""
    from geoseg.api import predict

    img = _require(VAL / "images" / "OAM-1238426-1046546-21.tif")
    masks = {}
    for bp in (64, 256):
        out = tmp_path / f"b{bp}"
        predict([str(img)], str(out), model="buildings",
                overrides=("runtime.engine=local", "output.report=false", "vector.formats=[parquet]",
                           "model.tta=d4", "tiling.tile_px=64", f"tiling.block_px={bp}"))
        masks[bp] = out / img.stem / "mask.tif"
    assert masks[64].read_bytes() == masks[256].read_bytes()
    with rasterio.open(masks[64]) as m, rasterio.open(img) as i:
        assert (m.crs, m.transform, m.shape) == (i.crs, i.transform, i.shape)
        assert 0.2 < (m.read(1) == 1).mean() < 0.95
    shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# U-Net stems and widths


def test_space_to_depth_stem_starts_from_the_averaging_models_function(tmp_path):
    """init_from an averaging-stem bundle into a space_to_depth U-Net: the converted weights compute the same
    logits, and every other tensor is the base model's."""
    torch.manual_seed(1)
    arch = {"base_channels": 4, "depth": 2, "input_stride": 2}
    module = get_model("unet", in_channels=3, num_classes=2, **arch).eval()
    card = ModelCard(
        name="avg", version="1", architecture="unet", arch_params={"in_channels": 3, "num_classes": 2, **arch},
        bands=["red", "green", "blue"], input_dtype="uint8",
        normalization={"name": "standardize", "params": {"mean": [120.0] * 3, "std": [40.0] * 3}},
        gsd_m=0.15, classes=CLASSES, output_stride=8, halo_px=16, license="test", attribution="test",
    )
    bundle = save_bundle(module, card, tmp_path / "avg")
    plan = prepare_plan(_cfg(bundle, arch_params={**arch, "stem": "space_to_depth"}))
    wide = get_model("unet", in_channels=3, num_classes=2, **arch, stem="space_to_depth").eval()
    wide.load_state_dict(plan["init_state"])
    assert wide.inc[0].weight.shape[1] == 12
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        assert torch.allclose(wide(x), module(x), atol=1e-5)
        # and it is a different network: sub-pixel detail that averaging removes now reaches the first convolution
        checker = torch.zeros(1, 3, 32, 32)
        checker[..., ::2, ::2] = 3.0
        flat = torch.full((1, 3, 32, 32), 0.75)
        assert torch.allclose(module(checker), module(flat), atol=1e-5)
        wide.inc[0].weight.add_(torch.randn_like(wide.inc[0].weight))
        assert not torch.allclose(wide(checker), wide(flat), atol=1e-3)
    with pytest.raises(ConfigError, match=r"arch_params .*'stem': 'space_to_depth'.*but train.arch_params"):
        prepare_plan(_cfg(bundle, arch_params={**arch, "stem": "space_to_depth", "depth": 3}))


def test_unet_stem_and_max_channels_are_checked_and_cap_the_widths():
    capped = get_model("unet", in_channels=3, num_classes=2, base_channels=8, depth=5, max_channels=32)
    assert [d[0].out_channels for d in capped.down] == [16, 32, 32, 32, 32]
    assert capped.output_stride == 32
    x = torch.randn(1, 3, 64, 96)
    assert capped(x).shape == (1, 2, 64, 96)
    with pytest.raises(ValueError, match=r"stem must be one of avg, space_to_depth; got 'conv'"):
        get_model("unet", in_channels=3, num_classes=2, input_stride=2, stem="conv")
    with pytest.raises(ValueError, match=r"max_channels \(4\) must be >= base_channels \(8\)"):
        get_model("unet", in_channels=3, num_classes=2, base_channels=8, max_channels=4)


def test_init_from_a_bundle_path_is_relative_to_the_job_file_and_a_name_stays_a_name(tmp_path, monkeypatch):
    from geoseg.config import load_config

    (tmp_path / "configs").mkdir()
    job = tmp_path / "configs" / "ft.yaml"
    job.write_text("train:\n  init_from: ../out/base\n")
    monkeypatch.chdir("/")
    assert load_config(job).train.init_from == str(tmp_path / "out" / "base")
    job.write_text("train:\n  init_from: buildings\n")
    assert load_config(job).train.init_from == "buildings"


def test_train_tta_goes_into_the_card_as_the_models_default():
    from geoseg.train.card_fill import make_card

    for tta, expect in ((None, None), ("none", None), ("d4", "d4")):
        cfg = config_from_dict({"train": {"classes": CLASSES, "tta": tta}})
        card = make_card(cfg.train, band_names=["r", "g", "b"], mean=[0.0] * 3, std=[1.0] * 3, gsd_m=0.1,
                         dtype="uint8", output_stride=4, halo_px=0, arch_params={"in_channels": 3, "num_classes": 2,
                                                                                 **ARCH})
        assert card.tta == expect
        assert ("tta" in card.model_dump()) == (expect is not None)
        module = get_model("unet", in_channels=3, num_classes=2, **ARCH)
        assert Predictor(type(load_model("buildings"))(card=card, module=module), "cpu").tta == (expect or "none")


# ---------------------------------------------------------------------------------------------------------
# the card's tile side


def test_card_tile_px_from_the_measured_halo_and_its_use_in_planning(base_bundle, tmp_path):
    from geoseg.plan import DEFAULT_TILE_PX, tile_size
    from geoseg.train.card_fill import recommended_tile_px

    assert [recommended_tile_px(h, 32) for h in (0, 64, 65, 128, 160, 192, 1000)] == [
        None, None, 512, 512, 1024, 1024, 1024]  # tile >= 4 halos: the halo read is at most 2.25x the tile
    assert recommended_tile_px(100, 48) == 528  # 512, rounded up to the stride
    card = load_model(base_bundle).card
    wide = card.model_copy(update={"tile_px": 512})
    cfg = config_from_dict({})
    assert tile_size(cfg, card) == DEFAULT_TILE_PX == 256 and tile_size(cfg, wide) == 512
    assert tile_size(config_from_dict({"tiling": {"tile_px": 128}}), wide) == 128  # the config wins
    with pytest.raises(ConfigError, match=r"tiling.block_px \(768\) must be a multiple of the tile side 512 that "
                                          r"model 'base' asks for"):
        tile_size(config_from_dict({"tiling": {"block_px": 768}}), wide)
    with pytest.raises(ValueError, match=r"tile_px \(102\) must be a multiple of output_stride \(4\)"):
        ModelCard.model_validate({**card.model_dump(), "tile_px": 102})
    # end to end: a scene predicted with the card's tile side records it in run.json
    from geoseg.api import predict

    bundle = save_bundle(load_model(base_bundle).module, wide, tmp_path / "wide")
    img = _require(VAL / "images" / "OAM-1238426-1046546-21.tif")
    predict([str(img)], str(tmp_path / "out"), model=str(bundle),
            overrides=("runtime.engine=local", "output.report=false", "vector.enabled=false"))
    import json

    rec = json.loads((tmp_path / "out" / img.stem / "run.json").read_text())
    assert rec["tiling"]["tile_px"] == 512, rec.get("tiling")
