"""Video output: a streaming, crash-safe, resumable MP4 + audio writer, safe file names, probing."""

from .frames import to_uint8_frames
from .naming import safe_output_path, sanitize_stem
from .probe import ProbeResult, probe_mp4
from .writer import StreamingMP4Writer, WriterSettings

__all__ = [
    "ProbeResult",
    "StreamingMP4Writer",
    "WriterSettings",
    "probe_mp4",
    "safe_output_path",
    "sanitize_stem",
    "to_uint8_frames",
]
