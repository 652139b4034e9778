"""Live audio (issue 19): PCM pushed in chunks of any size at 16/24/48 kHz, cut into segments,
features handed out block by block once the look-ahead has arrived. The tiny fixture wav2vec2,
speech-like audio; whole-utterance features from `AudioEncoder.encode` as the reference."""

import threading

import numpy as np
import pytest
import torch

from liveavatar_core.encoders.audio import SAMPLE_RATE, AudioEncoder
from liveavatar_core.errors import InputError
from liveavatar_core.live.audio import LiveAudio
from tests.test_audio_stream import WAV2VEC2_DIR, speech


@pytest.fixture(scope="module")
def encoder(ckpt_dir):
    return AudioEncoder.from_pretrained(ckpt_dir / WAV2VEC2_DIR)


def drain(live: LiveAudio) -> list:
    out = []
    while (block := live.next_block(timeout=0)) is not None:
        out.append(block)
    return out


@pytest.mark.parametrize("rate", [16000, 24000, 48000])
def test_blocks_carry_the_exact_samples_pushed_in_any_chunking(encoder, rate):
    x = speech(2.3, rate, seed=1)
    per_block = 12 * rate // 25
    runs = []
    for chunk in (rate // 50, 4096, x.size):  # 20 ms real-time chunks, odd chunks, one burst
        live = LiveAudio(encoder, rate, lookahead_s=0.3)
        for i in range(0, x.size, chunk):
            live.push((x[i:i + chunk] * 32767).astype(np.int16).tobytes())
        live.end_segment()
        runs.append(drain(live))
    blocks = runs[0]
    assert len(blocks) == -(-x.size // per_block)
    assert [b.index for b in blocks] == list(range(len(blocks))) and [b.last for b in blocks][-2:] == [False, True]
    assert all(b.samples.size == per_block and b.features.shape[-1] == 12 for b in blocks)
    pushed = (x * 32767).astype(np.int16).astype(np.float32) / 32768
    played = np.concatenate([b.samples for b in blocks])
    assert np.array_equal(played[:x.size], pushed) and not played[x.size:].any()
    assert sum(b.voiced for b in blocks) == x.size
    for other in runs[1:]:  # the result does not depend on how the audio was cut
        assert all(torch.equal(a.features, b.features) for a, b in zip(blocks, other))


def test_a_block_waits_for_its_look_ahead_and_then_holds(encoder):
    lookahead = 0.5
    live = LiveAudio(encoder, SAMPLE_RATE, lookahead_s=lookahead)
    x = speech(3.0, seed=2)
    need = int((0.48 + lookahead) * SAMPLE_RATE) + 400  # block 0's audio, the look-ahead, the last conv frame
    live.push(x[:int(0.48 * SAMPLE_RATE)])
    assert live.next_block(timeout=0) is None  # its own audio is there, the look-ahead is not
    live.push(x[int(0.48 * SAMPLE_RATE):need])
    first = live.next_block(timeout=0)
    assert first is not None and first.index == 0 and live.next_block(timeout=0) is None
    # The generating thread waits for audio; the network thread's push wakes it.
    got = []
    taker = threading.Thread(target=lambda: got.append(live.next_block(timeout=10)))
    taker.start()
    live.push(x[need:])
    taker.join(timeout=10)
    assert got and got[0].index == 1
    assert 1.0 < live.buffered_s < 3.0


def test_more_look_ahead_gives_features_closer_to_the_whole_context(encoder):
    """The look-ahead is the right context a block's wav2vec2 window sees: against the largest
    (4 s, most of this utterance), the features of 0, 0.5 and 2 s come closer in that order. (How
    far they stay from whole-file encoding, whose normalisation and 30 Hz grid need the whole
    length, is measured by bench/audio_windows.py.)"""
    x = speech(6.0, seed=3)

    def features(lookahead):
        live = LiveAudio(encoder, SAMPLE_RATE, lookahead_s=lookahead)
        live.push(x)
        live.end_segment()
        return torch.cat([b.features for b in drain(live)], dim=-1)

    widest = features(4.0)
    errors = [float((features(a) - widest).norm() / widest.norm()) for a in (0.0, 0.5, 2.0)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.25 * errors[0], errors


def test_segments_clear_and_refusals(encoder):
    live = LiveAudio(encoder, 24000, lookahead_s=0.2)
    live.push(speech(1.0, 24000, seed=4))
    live.end_segment()
    live.push(speech(0.7, 24000, seed=5))  # a second segment starts with the next push
    first = drain(live)
    assert [(b.segment, b.index) for b in first][:3] == [(0, 0), (0, 1), (0, 2)]
    assert first[2].last and all(b.segment == 1 for b in first[3:])
    assert live.clear() == 1 and live.buffered_s == 0 and live.next_block(timeout=0) is None
    live.push(speech(0.5, 24000, seed=6))
    live.end_segment()
    after = drain(live)
    assert after and all(b.segment == 2 for b in after) and after[0].index == 0
    live.push(np.zeros(100, np.float32))  # too short for one feature frame: one silent block
    live.end_segment()
    (short,) = drain(live)
    assert short.voiced == 100 and not short.features.any()
    live.close()
    assert live.next_block(timeout=0) is None
    for make, words in ((lambda: LiveAudio(encoder, 44100), "44100 Hz"),
                        (lambda: LiveAudio(encoder, 16000, lookahead_s=9), "outside 0..4"),
                        (lambda: LiveAudio(encoder, 16000).push(b"abc"), "whole 16-bit"),
                        (lambda: LiveAudio(encoder, 16000).push(np.zeros((2, 5), np.float32)), "mono"),
                        (lambda: LiveAudio(encoder, 16000, max_buffer_s=1).push(np.zeros(20000, np.float32)),
                         "would wait")):
        with pytest.raises(InputError, match=words):
            make()
