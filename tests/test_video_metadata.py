"""Prompt/workflow tags in the streaming MP4, in the form core SaveVideo (FFmpeg) writes them."""

import io
import json

import av
import numpy as np
import pytest

from liveavatar_core.errors import InputError
from liveavatar_core.video import StreamingMP4Writer, WriterSettings
from liveavatar_core.video.fmp4 import top_level_boxes
from tests.test_nodes_support import load_pack, pack_module

H, W, FPS, SR = 32, 48, 25, 16000
# What ComfyUI hands a saver: the API prompt and extra_pnginfo holding the UI workflow.
PROMPT = {"3": {"class_type": "LiveAvatarVideoWriter", "inputs": {"filename_prefix": "vidéo/✓"}}}
WORKFLOW = {"last_node_id": 3, "nodes": [{"id": 3, "type": "LiveAvatarVideoWriter"}], "links": []}
TAGS = {"prompt": json.dumps(PROMPT), "workflow": json.dumps(WORKFLOW)}


def frames(n: int, start: int = 0) -> np.ndarray:
    ramp = np.arange(start, start + n, dtype=np.uint8)[:, None, None, None] * 9
    return np.broadcast_to(ramp, (n, H, W, 3)).copy()


def write(path, settings: WriterSettings, blocks=(9, 12)) -> None:
    audio = np.zeros(SR, np.float32)
    with StreamingMP4Writer(path, W, H, FPS, audio=audio, sample_rate=SR, settings=settings) as writer:
        start = 0
        for n in blocks:
            writer.append(frames(n, start))
            start += n


def child_box(data: bytes, parent: bytes, kind: bytes) -> bytes | None:
    """Bytes of the `kind` box directly inside the top-level `parent` box."""
    for top, pos, size in top_level_boxes(data):
        if top == parent:
            for sub, sub_pos, sub_size in top_level_boxes(data[pos + 8:pos + size]):
                if sub == kind:
                    return data[pos + 8 + sub_pos:pos + 8 + sub_pos + sub_size]
    return None


def ffmpeg_mp4(tags: dict[str, str]) -> bytes:
    """A tiny MP4 from FFmpeg's own muxer with SaveVideo's options and these tags."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4", options={"movflags": "use_metadata_tags"}) as out:
        for key, value in tags.items():
            out.metadata[key] = value
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for picture in frames(2):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def test_tags_read_back_and_file_still_plays(tmp_path):
    path = tmp_path / "tagged.mp4"
    write(path, WriterSettings(preset="ultrafast", metadata=TAGS))
    with av.open(str(path)) as container:
        assert {k: container.metadata[k] for k in TAGS} == TAGS
        assert json.loads(container.metadata["prompt"]) == PROMPT
        assert sum(1 for _ in container.decode(video=0)) == 21


def test_udta_bytes_equal_ffmpeg_use_metadata_tags(tmp_path):
    # FFmpeg adds its own "encoder" key last; give ours the same one so whole boxes compare.
    reference = ffmpeg_mp4(TAGS)
    with av.open(io.BytesIO(reference)) as container:
        tags = {**TAGS, "encoder": container.metadata["encoder"]}
    path = tmp_path / "tagged.mp4"
    write(path, WriterSettings(preset="ultrafast", metadata=tags), blocks=(3,))
    ours = child_box(path.read_bytes(), b"moov", b"udta")
    assert ours is not None
    assert ours == child_box(reference, b"moov", b"udta")


def test_no_tags_no_udta(tmp_path):
    path = tmp_path / "plain.mp4"
    write(path, WriterSettings(preset="ultrafast"), blocks=(3,))
    assert child_box(path.read_bytes(), b"moov", b"udta") is None


def test_resume_keeps_tags_and_bytes(tmp_path):
    settings = WriterSettings(preset="ultrafast", metadata=TAGS)
    whole = tmp_path / "whole.mp4"
    write(whole, settings)
    resumed = tmp_path / "resumed.mp4"
    audio = np.zeros(SR, np.float32)
    with StreamingMP4Writer(resumed, W, H, FPS, audio=audio, sample_rate=SR, settings=settings) as writer:
        writer.append(frames(9))
        state = json.loads(json.dumps(writer.state()))
    with StreamingMP4Writer.resume(state, audio=audio, sample_rate=SR) as writer:
        writer.append(frames(12, 9))
    with av.open(str(resumed)) as container:
        assert container.metadata["workflow"] == TAGS["workflow"]
    assert child_box(resumed.read_bytes(), b"moov", b"udta") == child_box(whole.read_bytes(), b"moov", b"udta")


@pytest.mark.parametrize("bad", [{"prompt": {"a": 1}}, {"": "x"}, ["prompt"]])
def test_refuses_non_text_tags(bad):
    with pytest.raises(InputError) as info:
        WriterSettings(metadata=bad)
    assert "metadata" in str(info.value)


def test_node_tags_match_savevideo():
    writer = pack_module(load_pack(), "nodes.writer")
    tags = writer.video_metadata(PROMPT, {"workflow": WORKFLOW})
    assert tags == TAGS
    assert writer.video_metadata(None, None) == {}
