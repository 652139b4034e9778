"""Safe, non-overwriting output file names inside a chosen folder."""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

DEFAULT_STEM = "liveavatar"
_MAX_STEM_CHARS = 80
# Leaves room for "_00001" and the extension under the 255-byte limit most file systems have
# per name, whatever the script of the prompt (UTF-8 uses up to 4 bytes per character).
_MAX_STEM_BYTES = 200
# Characters Windows forbids in names, plus both separators; replaced so a prompt never picks
# a folder and a file written on Linux can still be copied to Windows.
_FORBIDDEN = re.compile(r'[<>:"/\\|?*]')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"{port}{i}" for port in ("com", "lpt") for i in range(1, 10))}


def sanitize_stem(text: str, max_chars: int = _MAX_STEM_CHARS) -> str:
    """A file-name stem from free text (a prefix or a prompt): one path component, never empty.

    Keeps letters and digits of any script (NFC-normalised), turns whitespace, separators and
    control or formatting characters into "_", and removes leading dots, so ".." or "../x"
    cannot name a parent folder or a hidden file.
    """
    text = unicodedata.normalize("NFC", str(text))
    chars = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch.isspace() or category[0] in "CZ" or _FORBIDDEN.match(ch):
            chars.append("_")
        else:
            chars.append(ch)
    stem = re.sub(r"_+", "_", "".join(chars)).strip("_. ")
    stem = stem[:max_chars]
    while len(stem.encode("utf-8")) > _MAX_STEM_BYTES:
        stem = stem[:-1]
    stem = stem.rstrip("_. ")
    if not stem:
        return DEFAULT_STEM
    if stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        stem = "_" + stem
    return stem


def _writable_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError("output folder", f"{path} exists and is not a folder.", "Choose a folder path.") from None
    except OSError as exc:
        raise InputError("output folder", f"cannot create {path}: {exc.strerror}.",
                         "Choose a folder you can write to.") from None
    if not path.is_dir():
        raise InputError("output folder", f"{path} is not a folder.", "Choose a folder path.")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError("output folder", f"{path} is not writable.", "Choose a folder you can write to.")
    return path.resolve()


def safe_output_path(folder: str | os.PathLike, stem: str, ext: str = ".mp4") -> Path:
    """A new path `folder/<stem>_<NNNNN><ext>` that does not exist yet.

    The folder is created if needed. The stem is sanitised (`sanitize_stem`), so the result is
    always directly inside `folder`; the counter continues after the highest one already used
    for this stem (as ComfyUI numbers its outputs), so earlier results are never overwritten.
    """
    return _numbered(_writable_folder(folder), stem, ext)


def _numbered(base: Path, stem: str, ext: str) -> Path:
    """The next free `base/<stem>_<NNNNN><ext>`; `base` may not exist yet (then the counter is 1)."""
    if not re.fullmatch(r"\.[A-Za-z0-9]{1,8}", ext):
        raise InputError("extension", f"{ext!r} is not a file extension.", "Use something like '.mp4'.")
    stem = sanitize_stem(stem)
    pattern = re.compile(re.escape(stem) + r"_(\d{5,})" + re.escape(ext) + r"$")
    names = [entry.name for entry in os.scandir(base)] if base.is_dir() else []
    used = [int(m.group(1)) for name in names if (m := pattern.match(name))]
    counter = max(used, default=0) + 1
    while True:
        candidate = base / f"{stem}_{counter:05d}{ext}"
        # lexists: a dangling symlink with this name would send the write somewhere else.
        if not os.path.lexists(candidate):
            break
        counter += 1
    if candidate.parent != base:
        raise InputError("file name", f"{stem!r} would leave the output folder.", "Use a plain name.")
    return candidate


@dataclass(frozen=True)
class OutputTarget:
    """Where a run writes its video, decided (and checked) before anything is created.

    path: the file to write. new_folders: the folders to create for it, outermost first.
    note: why `path` differs from the path asked for (None when it does not).
    """

    path: Path
    new_folders: tuple[Path, ...] = ()
    note: str | None = None

    def create_folders(self) -> None:
        """Create the missing folders (call right before writing)."""
        _writable_folder(self.path.parent)

    def remove_if_unused(self, companions: Sequence[Path] = ()) -> list[Path]:
        """After a failed run: delete the video if it holds no frame, with the files written for it
        (`companions`, such as its health sidecar), then the folders this target created if they are
        empty. Returns what was removed."""
        from .probe import probe_mp4

        removed = []
        if self.path.is_file():
            try:
                empty = probe_mp4(self.path, max_frames=0).frame_count == 0
            except InputError:  # not even a readable header: nothing of value
                empty = True
            if not empty:
                return removed
            self.path.unlink()
            removed.append(self.path)
        for path in companions:
            if path.is_file():
                path.unlink()
                removed.append(path)
        for folder in reversed(self.new_folders):
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
            removed.append(folder)
        return removed


def output_target(save_file: str | os.PathLike | None, default: str | os.PathLike, ext: str = ".mp4") -> OutputTarget:
    """The file for an explicit `save_file`, or a new numbered one next to `default` (None given).

    An explicit path is written as given, with `ext` added when it has no extension. Earlier
    results are never overwritten: an existing file of that name gives a numbered sibling, an
    existing folder a numbered file inside it; `note` then says so. Nothing is created yet, but
    the folder is checked: the nearest existing one must be a writable folder.
    """
    if save_file is None:
        default = Path(default).expanduser()
        path, note = _numbered(default.parent, default.stem, default.suffix or ext), None
    else:
        asked = Path(save_file).expanduser()
        if asked.is_dir():
            path = _numbered(asked, DEFAULT_STEM, ext)
            note = f"{asked} is a folder: writing {path.name} inside it."
        elif os.path.lexists(asked):
            path = _numbered(asked.parent, asked.stem, asked.suffix or ext)
            note = f"{asked} exists and is never overwritten: writing {path.name} next to it instead."
        else:
            path, note = (asked if asked.suffix else asked.with_name(asked.name + ext)), None
    folder = path.parent.absolute()
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise InputError("output folder", f"{folder} is not a folder.", "Choose a folder path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError("output folder", f"{folder} is not writable.", "Choose a folder you can write to.")
    return OutputTarget(path.absolute(), tuple(reversed(missing)), note)
