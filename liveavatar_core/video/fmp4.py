"""Fragmented MP4 (ISO/IEC 14496-12) boxes for one H.264 track and an optional AAC track.

We write the boxes ourselves instead of using FFmpeg's mp4 muxer because the writer needs two
things that muxer does not expose through PyAV: a fragment that is on disk the moment a block has
been appended (FFmpeg cuts a fragment only when the *next* keyframe arrives), and the ability to
continue an existing file after a restart with the right fragment numbers and decode times.

Layout: `ftyp` + `moov` (empty sample tables, `mvex`, optional `udta` text tags) once, then one
`moof` + `mdat` pair per fragment. Sample data offsets are relative to the `moof`
(default-base-is-moof), so every fragment is self-contained and can be appended to any file that
starts with the same init segment.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

VIDEO_TRACK_ID = 1
AUDIO_TRACK_ID = 2

# Per-sample flags (14496-12 8.8.3.1): an IDR frame depends on nothing; every other video frame
# depends on earlier ones and is not a sync sample. AAC frames are all independently decodable.
_SYNC_FLAGS = 0x02000000
_NON_SYNC_FLAGS = 0x01010000

_UNITY_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
_LANGUAGE_UND = 0x55C4  # ISO-639-2 "und" packed as three 5-bit letters


@dataclass(frozen=True)
class VideoTrack:
    """H.264 track description: `sps`/`pps` are raw NAL units (no start code, no length)."""

    width: int
    height: int
    timescale: int
    sps: bytes
    pps: bytes


@dataclass(frozen=True)
class AudioTrack:
    """AAC-LC track description: `config` is the AudioSpecificConfig from the encoder."""

    sample_rate: int
    channels: int
    config: bytes
    priming: int  # encoder delay in samples, hidden by the edit list
    bitrate: int


@dataclass(frozen=True)
class Sample:
    """One coded access unit: `data` as stored in `mdat` (length-prefixed NALs for H.264)."""

    data: bytes
    duration: int
    sync: bool


@dataclass(frozen=True)
class TrackRun:
    """The samples of one track inside one fragment, starting at `base_time` (track timescale)."""

    track_id: int
    base_time: int
    samples: Sequence[Sample]


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def annexb_to_nals(data: bytes) -> list[bytes]:
    """Split an Annex B byte stream (start-code delimited, as libx264 emits) into NAL units."""
    starts = []
    pos = data.find(b"\x00\x00\x01")
    while pos != -1:
        starts.append(pos + 3)
        pos = data.find(b"\x00\x00\x01", pos + 3)
    nals = []
    for i, start in enumerate(starts):
        end = starts[i + 1] - 3 if i + 1 < len(starts) else len(data)
        # The zero byte of a 4-byte start code (and trailing_zero_8bits) precede the next start
        # code; a NAL unit itself never ends in 0x00 (rbsp_trailing_bits ends with a 1 bit).
        nal = data[start:end].rstrip(b"\x00")
        if nal:
            nals.append(nal)
    return nals


def annexb_to_length_prefixed(data: bytes) -> bytes:
    """Convert one Annex B access unit to the 4-byte length-prefixed form MP4 stores."""
    return b"".join(struct.pack(">I", len(nal)) + nal for nal in annexb_to_nals(data))


def parameter_sets(extradata: bytes) -> tuple[bytes, bytes]:
    """SPS and PPS NAL units from libx264's global-header extradata (Annex B)."""
    nals = annexb_to_nals(extradata)
    sps = [n for n in nals if n[0] & 0x1F == 7]
    pps = [n for n in nals if n[0] & 0x1F == 8]
    if len(sps) != 1 or len(pps) != 1:
        raise RuntimeError(f"expected one SPS and one PPS in the H.264 extradata, got {len(sps)}/{len(pps)}")
    return sps[0], pps[0]


def _avcc(track: VideoTrack) -> bytes:
    sps, pps = track.sps, track.pps
    body = struct.pack(">BBBBBB", 1, sps[1], sps[2], sps[3], 0xFF, 0xE1)
    body += struct.pack(">H", len(sps)) + sps + struct.pack(">BH", 1, len(pps)) + pps
    if sps[1] in (100, 110, 122, 144):
        # High profiles carry chroma format and bit depths (14496-15 5.3.3.1.2); we always
        # encode 8-bit 4:2:0.
        body += bytes((0xFC | 1, 0xF8, 0xF8, 0))
    return _box(b"avcC", body)


def _descriptor(tag: int, payload: bytes) -> bytes:
    # Fixed 4-byte expandable size field, the form most muxers write.
    n = len(payload)
    size = bytes((0x80 | (n >> 21) & 0x7F, 0x80 | (n >> 14) & 0x7F, 0x80 | (n >> 7) & 0x7F, n & 0x7F))
    return bytes((tag,)) + size + payload


def _esds(track: AudioTrack) -> bytes:
    decoder_specific = _descriptor(0x05, track.config)
    # objectTypeIndication 0x40 = MPEG-4 audio; streamType 5 (audio) << 2 | upstream 0 | reserved 1.
    decoder_config = _descriptor(
        0x04,
        struct.pack(">BB", 0x40, 0x15) + (0).to_bytes(3, "big")
        + struct.pack(">II", track.bitrate, track.bitrate) + decoder_specific,
    )
    sl_config = _descriptor(0x06, b"\x02")
    es = _descriptor(0x03, struct.pack(">HB", AUDIO_TRACK_ID, 0) + decoder_config + sl_config)
    return _full_box(b"esds", 0, 0, es)


def _sample_entry_video(track: VideoTrack) -> bytes:
    compressor = b"\x00" * 32
    body = (
        b"\x00" * 6 + struct.pack(">H", 1)  # reserved, data_reference_index
        + b"\x00" * 16  # pre_defined / reserved
        + struct.pack(">HHII", track.width, track.height, 0x00480000, 0x00480000)
        + struct.pack(">IH", 0, 1) + compressor + struct.pack(">Hh", 0x18, -1)
    )
    return _box(b"avc1", body, _avcc(track))


def _sample_entry_audio(track: AudioTrack) -> bytes:
    # The 16.16 sample-rate field cannot hold rates above 65535; the real rate is in the
    # AudioSpecificConfig, which decoders prefer anyway.
    rate_field = (track.sample_rate if track.sample_rate < 65536 else 0) << 16
    body = (
        b"\x00" * 6 + struct.pack(">H", 1)
        + b"\x00" * 8  # version, revision, vendor
        + struct.pack(">HHHHI", track.channels, 16, 0, 0, rate_field)
    )
    return _box(b"mp4a", body, _esds(track))


def _empty_sample_tables(entry: bytes) -> bytes:
    return _box(
        b"stbl",
        _full_box(b"stsd", 0, 0, struct.pack(">I", 1), entry),
        _full_box(b"stts", 0, 0, struct.pack(">I", 0)),
        _full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
        _full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
        _full_box(b"stco", 0, 0, struct.pack(">I", 0)),
    )


def _trak(track_id: int, timescale: int, handler: bytes, handler_name: bytes, media_header: bytes,
          entry: bytes, width: int = 0, height: int = 0, volume: int = 0, edit: bytes = b"") -> bytes:
    tkhd = _full_box(
        b"tkhd", 0, 0x3,  # enabled | in movie
        struct.pack(">IIIII", 0, 0, track_id, 0, 0), b"\x00" * 8,
        struct.pack(">hhhH", 0, 0, volume, 0), _UNITY_MATRIX, struct.pack(">II", width << 16, height << 16),
    )
    mdhd = _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, _LANGUAGE_UND, 0))
    hdlr = _full_box(b"hdlr", 0, 0, struct.pack(">I", 0), handler, b"\x00" * 12, handler_name + b"\x00")
    dinf = _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1)))
    minf = _box(b"minf", media_header, dinf, _empty_sample_tables(entry))
    return _box(b"trak", tkhd, edit, _box(b"mdia", mdhd, hdlr, minf))


def _udta(metadata: Mapping[str, str]) -> bytes:
    # The `mdta` key/value form FFmpeg writes with `-movflags use_metadata_tags` (what ComfyUI's
    # SaveVideo uses): any key name survives, and both FFmpeg and the ComfyUI frontend read it.
    hdlr = _full_box(b"hdlr", 0, 0, struct.pack(">I", 0), b"mdta", b"\x00" * 12, b"\x00")
    names = [key.encode() for key in metadata]
    keys = _full_box(b"keys", 0, 0, struct.pack(">I", len(names)),
                     *(struct.pack(">I", 8 + len(n)) + b"mdta" + n for n in names))
    # Item type = 1-based key index; data type 1 = UTF-8 text, locale 0.
    items = [_box(struct.pack(">I", i), _box(b"data", struct.pack(">II", 1, 0), value.encode()))
             for i, value in enumerate(metadata.values(), start=1)]
    return _box(b"udta", _full_box(b"meta", 0, 0, hdlr, keys, _box(b"ilst", *items)))


def init_segment(video: VideoTrack, audio: AudioTrack | None, metadata: Mapping[str, str] | None = None) -> bytes:
    """`ftyp` + `moov` describing the tracks (and text tags); sample data follows only in fragments."""
    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isomiso6iso2avc1mp41")
    tracks = [_trak(
        VIDEO_TRACK_ID, video.timescale, b"vide", b"VideoHandler",
        _full_box(b"vmhd", 0, 1, b"\x00" * 8), _sample_entry_video(video), video.width, video.height,
    )]
    trex = [_full_box(b"trex", 0, 0, struct.pack(">IIIII", VIDEO_TRACK_ID, 1, 0, 0, 0))]
    if audio is not None:
        # AAC decoders output `priming` samples of encoder delay first; the edit list starts the
        # presentation after them so sound and picture both start at t = 0. A zero segment
        # duration means "to the end of the media", the usual form for fragmented files.
        elst = _full_box(b"elst", 0, 0, struct.pack(">IIIhh", 1, 0, audio.priming, 1, 0))
        tracks.append(_trak(
            AUDIO_TRACK_ID, audio.sample_rate, b"soun", b"SoundHandler",
            _full_box(b"smhd", 0, 0, b"\x00" * 4), _sample_entry_audio(audio),
            volume=0x0100, edit=_box(b"edts", elst),
        ))
        trex.append(_full_box(b"trex", 0, 0, struct.pack(">IIIII", AUDIO_TRACK_ID, 1, 0, 0, 0)))
    mvhd = _full_box(
        b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0), struct.pack(">IH", 0x10000, 0x0100),
        b"\x00" * 10, _UNITY_MATRIX, b"\x00" * 24, struct.pack(">I", len(tracks) + 1),
    )
    udta = [_udta(metadata)] if metadata else []
    return ftyp + _box(b"moov", mvhd, *tracks, _box(b"mvex", *trex), *udta)


def _moof(sequence: int, runs: Sequence[TrackRun], data_offsets: Sequence[int]) -> bytes:
    trafs = []
    for run, offset in zip(runs, data_offsets):
        entries = b"".join(
            struct.pack(">III", s.duration, len(s.data), _SYNC_FLAGS if s.sync else _NON_SYNC_FLAGS)
            for s in run.samples
        )
        trafs.append(_box(
            b"traf",
            _full_box(b"tfhd", 0, 0x020000, struct.pack(">I", run.track_id)),  # default-base-is-moof
            _full_box(b"tfdt", 1, 0, struct.pack(">Q", run.base_time)),
            # data-offset | sample-duration | sample-size | sample-flags present
            _full_box(b"trun", 0, 0x000701, struct.pack(">Ii", len(run.samples), offset), entries),
        ))
    return _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)


def fragment(sequence: int, runs: Sequence[TrackRun]) -> bytes:
    """One `moof` + `mdat` pair holding `runs` (tracks without samples are left out)."""
    runs = [r for r in runs if r.samples]
    if not runs:
        raise ValueError("a fragment needs at least one sample")
    sizes = [sum(len(s.data) for s in r.samples) for r in runs]
    # The moof size does not depend on the offsets it stores, so size it once with zeros.
    moof_size = len(_moof(sequence, runs, [0] * len(runs)))
    offsets, pos = [], moof_size + 8
    for size in sizes:
        offsets.append(pos)
        pos += size
    mdat = _box(b"mdat", *(s.data for r in runs for s in r.samples))
    return _moof(sequence, runs, offsets) + mdat


def top_level_boxes(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, size) of each complete top-level box; stops at a truncated tail."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1 and pos + 16 <= len(data):
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        if size < 8 or pos + size > len(data):
            return
        yield kind, pos, size
        pos += size
