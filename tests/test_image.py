"""Reference image: size strings, presets, every input form, refusals."""

import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from liveavatar_core.encoders.image import (SIZE_PRESETS, format_size, load_image, output_size, parse_size,
                                            preprocess_reference, resize_and_crop, target_area)
from liveavatar_core.errors import InputError

# MAX_AREA_CONFIGS of the official s2v-14B (wan_2_2/configs), as W*H strings.
OFFICIAL_AREAS = ("720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704", "1024*704", "704*1024",
                  "720*400", "704*384", "688*368", "384*256")


@pytest.fixture(scope="module")
def image_path(fixtures, manifest):
    return fixtures / manifest["inputs"]["image"]


@pytest.fixture(scope="module")
def area(manifest):
    return manifest["settings"]["max_area"]


@pytest.fixture(scope="module")
def from_file(image_path, area):
    return preprocess_reference(image_path, area)


@pytest.mark.parametrize("text", ["704*384", "704x384", "704X384", "704×384", "704 X 384", " 704 * 384 ",
                                  "704\tx 384"])
def test_size_spellings(text):
    assert parse_size(text) == (704, 384)
    assert format_size(parse_size(text)) == "704*384"


@pytest.mark.parametrize("text", ["", "704", "704*", "*384", "704*384*2", "704,384", "704.5*384", "-704*384",
                                  "large", "704 by 384"])
def test_bad_size_strings_list_the_valid_forms(text):
    with pytest.raises(InputError) as info:
        parse_size(text)
    assert info.value.input_name == "size"
    assert "W*H" in info.value.fix and "WxH" in info.value.fix and "704*384" in info.value.fix


def test_size_below_one_bucket_refused():
    with pytest.raises(InputError, match="smallest output area"):
        parse_size("32*32")
    with pytest.raises(InputError, match="smallest output area"):
        target_area(1000)


def test_presets_cover_the_official_areas_in_both_orientations():
    areas = {parse_size(p)[0] * parse_size(p)[1] for p in SIZE_PRESETS}
    assert {parse_size(a)[0] * parse_size(a)[1] for a in OFFICIAL_AREAS} <= areas
    for preset in SIZE_PRESETS:
        w, h = parse_size(preset)
        assert format_size((h, w)) in SIZE_PRESETS
    assert len(set(SIZE_PRESETS)) == len(SIZE_PRESETS)


def test_custom_sizes_accepted():
    assert target_area("1000*600") == 600000
    assert target_area((640, 640)) == 640 * 640


def test_size_search_spec_examples():
    """spec 2.1 worked results (verified there by re-running the official search)."""
    assert output_size(400, 720, 704 * 384) == (384, 704)
    assert output_size(720, 400, 704 * 384) == (704, 384)
    assert output_size(400, 720, 688 * 368) == (384, 640)
    assert output_size(400, 720, 1280 * 720) == (448, 768)
    assert output_size(1568, 2720, 704 * 384) == (384, 704)
    assert output_size(772, 828, 704 * 384) == (512, 512)


def test_all_input_forms_give_the_file_result(image_path, area, from_file):
    pil = Image.open(image_path).convert("RGB")
    uint8 = np.asarray(pil)
    comfy = torch.from_numpy(uint8).float().div(255)[None]  # ComfyUI LoadImage: [B, H, W, C] in [0, 1]
    for source in (pil, uint8, comfy, comfy[0], torch.cat([comfy, torch.zeros_like(comfy)])):
        tensor, size = preprocess_reference(source, area)
        assert size == from_file[1]
        assert torch.equal(tensor, from_file[0])


def test_alpha_and_palette_images_become_rgb(tmp_path, image_path, area, from_file):
    rgb = Image.open(image_path).convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(128)
    rgba.save(tmp_path / "rgba.png")
    assert torch.equal(preprocess_reference(tmp_path / "rgba.png", area)[0], from_file[0])
    palette = rgb.convert("P")
    palette.save(tmp_path / "p.png")
    expected = preprocess_reference(palette.convert("RGB"), area)[0]
    assert torch.equal(preprocess_reference(tmp_path / "p.png", area)[0], expected)
    assert load_image(Image.new("L", (32, 32), 7)).mode == "RGB"


def test_output_range_and_layout(from_file):
    tensor, (height, width) = from_file
    assert tensor.shape == (3, height, width) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert height % 64 == 0 and width % 64 == 0


def test_pad_and_crop_offsets():
    """Resize to the short side, then centre: padding splits deficit//2 first, crops round the offset."""
    stripes = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3))  # 200 wide, 100 high
    out = resize_and_crop(Image.fromarray(stripes), 100, 203)  # 3 px wider than the image: pad 1 left, 2 right
    assert out.shape == (100, 203, 3)
    assert np.all(out[:, 0] == 0) and np.all(out[:, -2:] == 0) and np.array_equal(out[:, 1:201], stripes)
    out = resize_and_crop(Image.fromarray(stripes), 100, 147)  # crop 53 px: offset round(26.5) = 26 (half-even)
    assert np.array_equal(out, stripes[:, 26:173])


def _png(path, levels: np.ndarray, bit_depth: int = 16, width: int | None = None, height: int | None = None):
    """A PNG written byte by byte (Pillow saves no 16-bit colour PNGs); `width`/`height` may lie."""
    h, w = levels.shape[:2]
    channels = 1 if levels.ndim == 2 else levels.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\0" + levels[y].astype(">u2" if bit_depth == 16 else "u1").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width or w, height or h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_high_bit_depth_images_are_scaled_to_8_bits(tmp_path):
    # A 16-bit gray ramp: Pillow opens it as mode I;16, whose convert('RGB') clips every level
    # above 255 to white. Each level must keep its high byte, as a viewer shows it.
    ramp = (np.arange(64)[None, :].repeat(32, 0) * 1040).astype(np.uint16)
    gray = np.asarray(load_image(_png(tmp_path / "gray16.png", ramp)))
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    np.testing.assert_array_equal(gray, np.repeat((ramp >> 8)[..., None], 3, axis=2).astype(np.uint8))
    # The same levels as a PIL image in memory (mode I, 32-bit) and as 16-bit RGB and gray+alpha PNGs.
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(ramp.astype(np.int32)))), gray)
    rgb = np.stack([ramp, 65535 - ramp, np.full_like(ramp, 40000)], axis=2)
    colour = np.asarray(load_image(_png(tmp_path / "rgb16.png", rgb)))
    np.testing.assert_array_equal(colour, (rgb >> 8).astype(np.uint8))
    alpha = np.stack([ramp, np.full_like(ramp, 65535)], axis=2)
    np.testing.assert_array_equal(np.asarray(load_image(_png(tmp_path / "la16.png", alpha))), gray)
    # Float TIFFs: [0, 1] levels, or 0..255 when they exceed 1.
    unit = ramp / 65535.0
    Image.fromarray(unit.astype(np.float32)).save(tmp_path / "unit.tiff")
    floats = np.asarray(load_image(tmp_path / "unit.tiff"))[..., 0]
    np.testing.assert_array_equal(floats, np.round(unit * 255).astype(np.uint8))
    Image.fromarray((unit * 255).astype(np.float32)).save(tmp_path / "bytes.tiff")
    np.testing.assert_allclose(np.asarray(load_image(tmp_path / "bytes.tiff"))[..., 0], floats, atol=1)


def test_decompression_bomb_refused_with_its_size(tmp_path):
    # A real PNG whose header claims 20000 x 10000 pixels (200 MP, above Pillow's ~179 MP limit):
    # Pillow refuses it from the header alone, so the test stays cheap.
    bomb = _png(tmp_path / "huge.png", np.zeros((1, 1), np.uint8), bit_depth=8, width=20000, height=10000)
    with pytest.raises(InputError, match=r"huge.png has 200 megapixels.*downscale") as info:
        load_image(bomb)
    assert info.value.input_name == "image"
    with pytest.raises(InputError, match="200 megapixels"):
        preprocess_reference(bomb, "704*384")


@pytest.mark.parametrize("shape", [(8, 100, 3), (100, 15, 3)])
def test_image_smaller_than_a_patch_refused(shape):
    with pytest.raises(InputError, match="16-px patch") as info:
        preprocess_reference(np.full(shape, 200, np.uint8), "704*384")
    assert info.value.input_name == "image"


def test_too_elongated_image_refused():
    with pytest.raises(InputError, match="too elongated"):
        preprocess_reference(np.full((16, 24000, 3), 200, np.uint8), "384*256")


def test_missing_and_corrupt_files_refused(tmp_path):
    with pytest.raises(InputError, match="not found") as info:
        preprocess_reference(tmp_path / "nope.png", "704*384")
    assert info.value.input_name == "image"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(InputError, match="cannot read") as info:
        preprocess_reference(bad, "704*384")
    assert info.value.input_name == "image"


def test_bad_tensor_and_array_shapes_refused():
    with pytest.raises(InputError, match="IMAGE tensor"):
        load_image(torch.zeros(1, 3, 64, 64, 2))
    with pytest.raises(InputError, match="uint8"):
        load_image(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InputError, match="expected a file path"):
        load_image(42)


def test_chosen_size_is_logged(image_path, area, caplog):
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        _, (height, width) = preprocess_reference(image_path, area)
    assert any(f"{width}x{height}" in r.getMessage() for r in caplog.records if r.name == "liveavatar")
