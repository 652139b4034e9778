"""Generator loading refuses impossible placements before reading any weight."""

import pytest

from liveavatar_core.errors import InputError
from liveavatar_core.loading import load_generator, official_folder


@pytest.mark.parametrize("kwargs,name", [
    ({"offload": "block_swap", "blocks_on_gpu": 10}, "offload"),
    ({"precision": "fp8"}, "fp8"),
    ({"precision": "int4"}, "precision"),
    ({"attention": "nope"}, "attention"),
    ({"offload": "sideways"}, "offload"),
])
def test_impossible_placements_refused(ckpt_dir, kwargs, name):
    folder = official_folder(ckpt_dir)
    with pytest.raises(InputError) as err:
        load_generator(folder.dit, folder.vae, None, dit_device="cpu", **kwargs)
    assert str(err.value).startswith(f"{name}:") and "Fix:" in str(err.value)


def test_official_folder_names_missing_parts(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="diffusion_pytorch_model.*models_t5_umt5-xxl-enc-bf16.pth"):
        official_folder(tmp_path)
