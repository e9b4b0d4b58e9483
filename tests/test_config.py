"""The config tree: every file in configs/ validates; typos and bad values give one clear error."""

from pathlib import Path

import pytest

from geoseg.config import JobConfig, apply_overrides, config_from_dict, load_config
from geoseg.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    # a training job carries its data in train.sources; a mapping job writes to output.dir (a region job's
    # scenes and AOI come on the command line)
    assert cfg.train.sources or cfg.output.dir


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"tiling": {"tile_pxx": 256}}, source="job.yaml")
    msg = str(e.value)
    assert "job.yaml" in msg and "tiling.tile_pxx" in msg and "block_px" in msg and "tile_px" in msg


def test_bad_values():
    with pytest.raises(ConfigError, match="tiling.tile_px"):
        config_from_dict({"tiling": {"tile_px": -4}})
    with pytest.raises(ConfigError, match="multiple of tiling.tile_px"):
        config_from_dict({"tiling": {"tile_px": 256, "block_px": 300}})
    with pytest.raises(ConfigError, match="runtime.device"):
        config_from_dict({"runtime": {"device": "tpu"}})
    with pytest.raises(ConfigError, match="1-based"):
        config_from_dict({"input": {"bands": [0, 1]}})


def test_overrides_parse_yaml_values():
    data = apply_overrides({"tiling": {"tile_px": 256}}, ["tiling.block_px=512", "input.bands=[2,3,4]",
                                                            "runtime.address=ray://head:10001"])
    cfg = config_from_dict(data)
    assert cfg.tiling.block_px == 512 and cfg.input.bands == [2, 3, 4]
    assert cfg.runtime.address == "ray://head:10001"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["tiling.block_px"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_error_pickles():
    import pickle

    e = ConfigError("x.yaml: bad")
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is ConfigError and str(e2) == "x.yaml: bad" and isinstance(e2, ValueError)
