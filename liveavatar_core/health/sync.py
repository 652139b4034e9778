"""Audio-to-mouth offset without a lip-sync network: audio energy per video frame against the motion
of the mouth region, cross-correlated over a sliding window.

Sign convention: a positive lag means the video lags the audio (the mouth moves `lag` frames after
the sound that drives it); negative, the mouth moves first. The confidence is the peak correlation
minus the median over all lags, as Sync-C is for SyncNet distances (spec/live.md 6).
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def frame_rms(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """RMS of `audio` split into `n_frames` equal runs of samples (the samples that drove each frame)."""
    edges = np.linspace(0, audio.size, n_frames + 1).round().astype(np.int64)
    squares = np.concatenate([[0.0], np.cumsum(np.square(audio, dtype=np.float64))])
    counts = np.maximum(np.diff(edges), 1)
    return np.sqrt(np.maximum(np.diff(squares[edges]), 0.0) / counts)


def audio_activity(rms: np.ndarray, previous: float) -> np.ndarray:
    """Per-frame change of the audio envelope, |rms[t] - rms[t-1]| (`previous`: the frame before).

    Mouth-region motion is a frame difference, so it follows how fast the mouth opens or closes,
    which tracks how fast the loudness changes, not the loudness itself; correlating like with like
    gives one sharp peak at the true lag instead of the two shoulders that loudness against
    motion gives around it.
    """
    return np.abs(np.diff(np.concatenate([[previous], rms])))


def lagged_correlation(audio: np.ndarray, video: np.ndarray, max_lag: int) -> np.ndarray:
    """Pearson correlation of audio[t] with video[t + lag] for lag = -max_lag..max_lag (mean removed
    over each overlap); pairs with a NaN (a frame not measured) are left out."""
    n = audio.size
    out = np.zeros(2 * max_lag + 1)
    for i, lag in enumerate(range(-max_lag, max_lag + 1)):
        a = audio[max(0, -lag):n - max(0, lag)]
        v = video[max(0, lag):n - max(0, -lag)]
        keep = np.isfinite(a) & np.isfinite(v)
        a = a[keep] - a[keep].mean() if keep.any() else a[:0]
        v = v[keep] - v[keep].mean() if keep.any() else v[:0]
        out[i] = float(a @ v) / (np.sqrt(float(a @ a) * float(v @ v)) + _EPS)
    return out


class OffsetEstimator:
    """Sliding window of per-frame (audio activity, mouth motion, speech) and the lag estimate."""

    def __init__(self, window: int, max_lag: int, min_speech_frames: int):
        self.window, self.max_lag, self.min_speech = window, max_lag, min_speech_frames
        self._audio = np.zeros(0)
        self._video = np.zeros(0)
        self._speech = np.zeros(0, dtype=bool)

    def push(self, audio: np.ndarray, video: np.ndarray, speech: np.ndarray) -> None:
        """Append one block's frames (video NaN where not measured); the window keeps the last `window`."""
        self._audio = np.concatenate([self._audio, audio])[-self.window:]
        self._video = np.concatenate([self._video, video])[-self.window:]
        self._speech = np.concatenate([self._speech, speech])[-self.window:]

    def estimate(self) -> tuple[int | None, float | None]:
        """(lag in frames, confidence), or (None, None) while the window holds too little speech."""
        if int((self._speech & np.isfinite(self._video)).sum()) < self.min_speech:
            return None, None
        corr = lagged_correlation(self._audio, self._video, self.max_lag)
        peak = int(np.argmax(corr))
        return peak - self.max_lag, float(corr[peak] - np.median(corr))
