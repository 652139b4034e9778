"""Output names: sanitised stems, never outside the chosen folder, never overwriting."""

import os

import numpy as np
import pytest

from liveavatar_core.errors import InputError
from liveavatar_core.video import safe_output_path, sanitize_stem


@pytest.mark.parametrize("stem", [
    "../../etc/passwd", "..", "../", "/abs/path/video", "a/../../b", "..\\..\\windows\\x", "C:\\temp\\x",
    "~/x", "name\x00with\x1bcontrol\nchars", "\u202eevil\u200b", ".bashrc", "   ", "", "...",
])
def test_stems_that_try_to_escape_stay_inside_the_folder(tmp_path, stem):
    path = safe_output_path(tmp_path, stem)
    assert path.parent == tmp_path.resolve()
    assert path.suffix == ".mp4"
    name = path.name
    assert not name.startswith(".")
    assert not any(ch in name for ch in "/\\:\x00\x1b\n\u202e\u200b")


def test_sanitised_stems_keep_unicode_and_are_length_limited():
    assert sanitize_stem("Größe café 日本語 😀") == "Größe_café_日本語_😀"
    assert sanitize_stem("a  b\t\tc") == "a_b_c"
    assert sanitize_stem("e\u0301") == "\u00e9"  # NFC: one code point, as the OS will store it
    assert sanitize_stem("CON") == "_CON" and sanitize_stem("nul.txt") == "_nul.txt"
    assert sanitize_stem("") == "liveavatar"
    long = sanitize_stem("語" * 500)
    assert len(long) <= 80 and len(long.encode()) <= 200
    assert len(sanitize_stem("😀" * 100).encode()) <= 200


def test_counter_continues_after_the_highest_existing_name(tmp_path):
    first = safe_output_path(tmp_path, "avatar")
    assert first.name == "avatar_00001.mp4"
    first.write_bytes(b"")
    (tmp_path / "avatar_00007.mp4").write_bytes(b"")
    (tmp_path / "avatar_extra_00050.mp4").write_bytes(b"")  # another stem: ignored
    assert safe_output_path(tmp_path, "avatar").name == "avatar_00008.mp4"
    assert safe_output_path(tmp_path, "avatar", ".wav").name == "avatar_00001.wav"


def test_an_existing_symlink_is_never_reused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "out"
    folder.mkdir()
    os.symlink(outside / "target.mp4", folder / "clip_00001.mp4")  # dangling link to elsewhere
    assert safe_output_path(folder, "clip").name == "clip_00002.mp4"


def test_missing_folders_are_created(tmp_path):
    path = safe_output_path(tmp_path / "a" / "b", "x")
    assert path.parent.is_dir() and path.name == "x_00001.mp4"


def test_unusable_folders_are_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(InputError, match="output folder"):
        safe_output_path(blocker, "x")
    with pytest.raises(InputError, match="output folder"):
        safe_output_path(blocker / "sub", "x")
    with pytest.raises(InputError, match="extension"):
        safe_output_path(tmp_path, "x", "mp4/../../y")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_read_only_folder_is_rejected(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable"):
            safe_output_path(folder, "x")
    finally:
        folder.chmod(0o700)


# --- the file a run writes (the command line's --save_file) ----------------------------------------------

def test_an_explicit_path_is_written_as_given(tmp_path):
    from liveavatar_core.video.naming import output_target

    target = output_target(tmp_path / "out.mp4", tmp_path / "default.mp4")
    assert target.path == tmp_path / "out.mp4" and target.note is None and target.new_folders == ()
    assert output_target(tmp_path / "clip", tmp_path / "d.mp4").path == tmp_path / "clip.mp4"
    # Without one, each run gets a new numbered file next to the default.
    assert output_target(None, tmp_path / "default.mp4").path == tmp_path / "default_00001.mp4"


def test_an_existing_file_or_folder_is_never_overwritten_and_the_note_says_where(tmp_path):
    from liveavatar_core.video.naming import output_target

    (tmp_path / "out.mp4").write_bytes(b"an earlier video")
    target = output_target(tmp_path / "out.mp4", tmp_path / "d.mp4")
    assert target.path == tmp_path / "out_00001.mp4"
    assert "exists" in target.note and "out_00001.mp4" in target.note
    folder = tmp_path / "videos"
    folder.mkdir()
    target = output_target(folder, tmp_path / "d.mp4")
    assert target.path.parent == folder and target.path.name == "liveavatar_00001.mp4"
    assert "is a folder" in target.note


def test_folders_are_made_only_to_write_and_removed_when_nothing_was_written(tmp_path):
    from liveavatar_core.video import StreamingMP4Writer
    from liveavatar_core.video.naming import output_target

    target = output_target(tmp_path / "a" / "b" / "out.mp4", tmp_path / "d.mp4")
    assert not (tmp_path / "a").exists()  # checked, not created
    assert target.new_folders == (tmp_path / "a", tmp_path / "a" / "b")
    target.create_folders()
    StreamingMP4Writer(target.path, 64, 64).close()  # a run that failed before its first frame
    assert target.remove_if_unused() == [target.path, tmp_path / "a" / "b", tmp_path / "a"]
    assert list(tmp_path.iterdir()) == []

    # A video with frames stays, and so do its folders.
    target.create_folders()
    with StreamingMP4Writer(target.path, 64, 64) as writer:
        writer.append(np.zeros((3, 64, 64, 3), np.uint8))
    assert target.remove_if_unused() == [] and target.path.is_file()


def test_an_unusable_output_folder_is_refused_before_anything_is_made(tmp_path):
    from liveavatar_core.video.naming import output_target

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is not a folder") as info:
        output_target(tmp_path / "file" / "sub" / "out.mp4", tmp_path / "d.mp4")
    assert info.value.input_name == "output folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
