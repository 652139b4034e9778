"""DiTConfig.from_json on real config.json files: every way the file breaks is a WeightsError with the fix."""

import json

import pytest

from liveavatar_core.config import DiTConfig
from liveavatar_core.errors import WeightsError


@pytest.fixture()
def official(ckpt_dir):
    return json.loads((ckpt_dir / "config.json").read_text())


def test_the_fixture_config_reads(ckpt_dir, official):
    cfg = DiTConfig.from_json(ckpt_dir / "config.json")
    assert (cfg.dim, cfg.num_layers, cfg.audio_inject_layers) == (official["dim"], official["num_layers"],
                                                                   tuple(official["audio_inject_layers"]))


@pytest.mark.parametrize("text, expect", [
    (None, "not found"),
    ('{"dim": 128,', "is not valid JSON"),
    ("\xff\xfe garbage", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('"s2v"', "holds a JSON str, not an object"),
    ('{"model_type": "t2v"}', "describes a Wan 't2v' model"),
])
def test_unreadable_files(tmp_path, text, expect):
    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text, encoding="latin-1")
    with pytest.raises(WeightsError, match=expect) as err:
        DiTConfig.from_json(path)
    assert err.value.input_name == "ckpt_dir" and str(path) in str(err.value) and err.value.fix


def test_a_folder_named_config_json(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(WeightsError, match="cannot read") as err:
        DiTConfig.from_json(tmp_path / "config.json")
    assert err.value.fix


@pytest.mark.parametrize("key, value, expect", [
    ("num_layers", "x", 'num_layers is "x", a positive integer is expected'),
    ("num_layers", True, "num_layers is true, a positive integer"),
    ("num_layers", 4.0, "num_layers is 4.0, a positive integer"),
    ("dim", 0, "dim is 0, a positive integer"),
    ("num_heads", None, "num_heads is null"),
    ("eps", "1e-6", 'eps is "1e-6", a positive number'),
    ("eps", -1, "eps is -1, a positive number"),
    ("audio_inject_layers", [0, "2"], "a list of some non-negative integers"),
    ("audio_inject_layers", 3, "audio_inject_layers is 3"),
    ("zip_frame_buckets", [1, 2], "a list of 3 non-negative integers"),
    ("motion_frames", {"a": 1}, "a list of 2 non-negative integers"),
    ("num_heads", 3, "dim 128 is not divisible by num_heads 3"),
    ("audio_inject_layers", [0, 2, 4], "name layers beyond num_layers 4"),
])
def test_fields_of_the_wrong_type_or_range(tmp_path, official, key, value, expect):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**official, key: value}))
    with pytest.raises(WeightsError) as err:
        DiTConfig.from_json(path)
    assert expect in str(err.value) and str(path) in str(err.value)
    assert "config.json" in err.value.fix


def test_keys_the_official_class_ignores_stay_ignored(tmp_path, official):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**official, "patch_size": "anything", "window_size": [-1, -1], "unknown": 1}))
    cfg = DiTConfig.from_json(path)
    assert cfg.patch_size == (1, 2, 2) and cfg.extra["unknown"] == 1
