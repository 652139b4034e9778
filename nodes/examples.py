"""The example picture and speech that the shipped workflows name, for a fresh install.

The workflows' Load Image and Load Audio nodes read `liveavatar_reference.png` and
`liveavatar_speech.wav` from ComfyUI's input folder, which a new install does not have. When the
pack is imported, each file of `example_inputs/` that the input folder lacks is copied there, so
opening a template and pressing Run makes a video. A file of that name already there is the
user's and is never replaced.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("liveavatar")

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "example_inputs"


def install_example_inputs(target: Path | None = None) -> list[Path]:
    """Copy the missing example inputs into `target` (default: ComfyUI's input folder); returns
    the files written. Outside ComfyUI without a `target` it does nothing."""
    if target is None:
        try:
            import folder_paths
        except ImportError:
            return []
        target = Path(folder_paths.get_input_directory())
    written = []
    try:
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(EXAMPLE_DIR.iterdir()):
            destination = target / source.name
            if destination.exists():
                continue
            data = source.read_bytes()
            try:
                with open(destination, "xb") as dst:  # "x": never replace a file that is there
                    try:
                        dst.write(data)
                    except OSError:
                        destination.unlink(missing_ok=True)  # no half file to block the next start
                        raise
            except FileExistsError:
                continue
            written.append(destination)
    except OSError as exc:  # a read-only input folder must not hide the nodes
        log.warning("Live Avatar: could not copy the example inputs into %s (%s); the example workflows "
                    "need liveavatar_reference.png and liveavatar_speech.wav there.", target, exc)
    return written
