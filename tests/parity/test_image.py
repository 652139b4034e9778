"""Reference preprocessing against golden/03_image and the manifest's size-search table."""

import torch
from safetensors.torch import load_file

from liveavatar_core.encoders.image import output_size, preprocess_reference


def test_size_search_matches_every_official_row(manifest):
    table = manifest["size_table_get_size_less_than_area"]
    assert table
    for row in table:
        assert list(output_size(*row["img_hw"], row["max_area"])) == row["out_hw"], row


def test_reference_pixels_exact(fixtures, manifest):
    expected = load_file(fixtures / "golden" / "03_image.safetensors")["ref_pixel_values"]
    tensor, (height, width) = preprocess_reference(fixtures / manifest["inputs"]["image"],
                                                   manifest["settings"]["max_area"])
    assert (height, width) == tuple(manifest["settings"]["size_hw"]) == tuple(expected.shape[1:])
    assert tensor.dtype == torch.float32
    assert torch.equal(tensor, expected)

