"""The layer layout with real worker processes over gloo on CPU ranks (tiny checkpoint, fp32):
each rank runs a layer range of every step in wavefront order (parallel/layers.py); the frames and
the sampler's tensors must be those of one process, and a cancelled run must resume on the step
layout into the same video."""

from math import gcd

import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.parallel.layers import cell_time, skew
from liveavatar_core.parallel.layout import layer_layout, split_layers, step_layout
from liveavatar_core.parallel.remote import load_parallel
from liveavatar_core.pipeline import generate, write_mp4
from liveavatar_core.resume import load_resume_state
from liveavatar_core.video.probe import probe_mp4
from tests.test_parallel import OFFICIAL, STREAMING, _same, _sampler_tensors, inputs, single, tiny  # noqa: F401


def _load(tiny, inputs, layout):
    folder = inputs[0]
    return load_parallel(folder.dit, folder.vae, tiny.lora, precision="fp32", layout=layout)


def _check(stream, single, mode):
    got = [c.frames for c in stream]
    assert _same(got, single[mode]), mode
    want, have = single[mode + " state"], _sampler_tensors(stream)
    assert sorted(have) == sorted(want) and any("latents" in k for k in want)
    assert all(torch.equal(have[k], want[k]) for k in want), [k for k in want if not torch.equal(have[k], want[k])]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_layer_layout_gives_the_frames_and_tensors_of_one_process(tiny, inputs, single, n):
    _, text, audio = inputs
    layout = layer_layout(["cpu"] * n, 4)
    model = _load(tiny, inputs, layout)
    assert f"layers 0-{layout.layers[0].stop - 1} loaded" in model.description  # rank 0's units only
    try:
        for settings in (STREAMING, OFFICIAL) if n == 3 else (STREAMING,):
            _check(generate(model, text, audio, tiny.image, settings), single, settings.mode)
    finally:
        model.close()
    assert all(p.poll() is not None for p in model.group.procs)


def test_resume_on_layers_then_cancel_then_resume_on_steps_completes_the_same_video(tiny, inputs, single, tmp_path):
    """Stopped on the step layout in clip 0 (the sink refresh still ahead), resumed on 3 layer ranks
    and stopped again once several blocks are in flight, then finished on the step layout: the
    video of one process."""
    _, text, audio = inputs
    path, state = tmp_path / "video.mp4", tmp_path / "video.mp4.resume"
    chunks, ends = [], []
    for layout, stop_after in ((step_layout(["cpu"] * 2), 1), (layer_layout(["cpu"] * 3, 4), 1),
                               (step_layout(["cpu"] * 2), None)):
        model = _load(tiny, inputs, layout)
        try:
            resume = state if chunks else None
            stream = generate(model, text, audio, tiny.image, STREAMING, resume_from=resume,
                              should_stop=None if stop_after is None else (
                                  lambda target=len(chunks) + stop_after: stream.stats.blocks_done >= target))
            write_mp4(stream, path, on_chunk=lambda c: chunks.append(c.frames.copy()), resume_path=state)
        finally:
            model.close()
        ends.append(len(chunks))
        assert _same(chunks, single["streaming"][:len(chunks)])
        if stop_after is not None:
            # The blocks in flight were finished, every rank at the same block; the file is the
            # single-process format: every layer of every step's cache.
            assert not stream.finished and state.is_file() and probe_mp4(path).frame_count == sum(map(len, chunks))
            saved = load_resume_state(state)
            assert "layers" not in saved["meta"]["sampler"]
            assert all(v.shape[0] == 4 for k, v in saved["tensors"].items() if k.startswith("sampler.cache"))
            assert {k for k in saved["tensors"] if k.startswith("sampler.cond.k")} == \
                {f"sampler.cond.k.layer{i}" for i in range(4)}
    assert 0 < ends[0] < 4 and ends[0] + 1 < ends[1] < 12  # a stop in clip 0 (4 blocks per clip), one later
    assert stream.finished and not state.exists()
    assert _same(chunks, single["streaming"])


def test_official_cancel_at_the_clip_boundary_resumes_on_layers(tiny, inputs, single, tmp_path):
    """Official online decode: the stop lands where clip 0 is decoded and the decoder's sink
    refresh has happened (the blocks in flight end clip 0); 2 layer ranks resume from there."""
    _, text, audio = inputs
    path, state = tmp_path / "video.mp4", tmp_path / "video.mp4.resume"
    chunks, done = [], []
    for layout, stop in ((layer_layout(["cpu"] * 3, 4), 1), (layer_layout(["cpu"] * 2, 4), None)):
        model = _load(tiny, inputs, layout)
        try:
            stream = generate(model, text, audio, tiny.image, OFFICIAL, resume_from=state if done else None,
                              should_stop=None if stop is None else (lambda t=stop: stream.stats.blocks_done >= t))
            write_mp4(stream, path, on_chunk=lambda c: chunks.append(c.frames.copy()), resume_path=state)
        finally:
            model.close()
        done.append(stream.stats.blocks_done)
    assert done[0] < 12 and stream.finished
    assert _same(chunks, single["official"])


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_wavefront_schedule_is_conflict_free_causal_and_ordered(n):
    """Spec 2: per rank no two cells at one time; each input made earlier; per rank pair the
    sends and receives in the same order (the receiver's times are the sender's plus a constant)."""
    steps, blocks = 4, 12
    d = skew(n, steps)
    assert d >= 1 and gcd(n + d, steps) == 1 and all(gcd(n + e, steps) != 1 for e in range(1, d))
    T = {(b, s, k): cell_time(b, s, k, n, steps) for b in range(blocks) for s in range(steps) for k in range(n)}
    for k in range(n):
        times = [T[b, s, k] for b in range(blocks) for s in range(steps)]
        assert len(set(times)) == len(times)
    for (b, s, k), t in T.items():
        deps = [(b, s, k - 1)] if k else ([(b, s - 1, n - 1)] if s else [])
        deps += [(b - 1, s, k)] if b else []
        assert all(T[dep] < t for dep in deps)
    for src, dst in [(k, k + 1) for k in range(n - 1)] + [(n - 1, 0)]:
        msgs = [(b, s) for b in range(blocks) for s in range(steps) if src < n - 1 or s < steps - 1]
        sent = sorted(msgs, key=lambda c: T[c[0], c[1], src])
        got = sorted(msgs, key=lambda c: T[c[0], c[1] + (src == n - 1), dst])
        assert sent == got
    # Steady state: every rank busy at every time once the pipeline is full.
    busy = {t for (b, s, k), t in T.items() if k == 0}
    fill = (steps - 1) * (n + d)
    assert all(t in busy for t in range(fill, steps * blocks))


def test_layer_split_and_refusals():
    assert [len(r) for r in split_layers(40, 4)] == [11, 11, 11, 7]
    assert [len(r) for r in split_layers(40, 2)] == [22, 18]
    assert [list(r) for r in split_layers(4, 3)] == [[0, 1], [2], [3]]
    lay = layer_layout(["cpu"] * 2, 4)
    assert lay.vae_rank == 1 and lay.part(1) == ((0, 1, 2, 3), range(2, 4)) and "layers 2-3 + VAE" in lay.describe()
    with pytest.raises(InputError, match="at most 4"):
        layer_layout(["cpu"] * 5, 4)
    with pytest.raises(InputError, match="at least 2"):
        layer_layout(["cpu"], 4)
    with pytest.raises(InputError, match="more than once"):
        layer_layout(["cuda:0", "cuda:0"], 4)
    with pytest.raises(InputError, match="dedicated VAE"):
        layer_layout(["cpu"] * 2, 4, vae_device="cpu")


def test_a_rank_loads_only_its_layers_units_and_the_base(tiny, inputs):
    from liveavatar_core.loading import load_generator
    from liveavatar_core.model.dit import unit_of

    folder = inputs[0]
    whole = load_generator(folder.dit, None, tiny.lora, precision="fp32").dit
    part = load_generator(folder.dit, None, tiny.lora, precision="fp32", layers=range(1, 3)).dit
    params = dict(whole.named_parameters())
    for name, p in part.named_parameters():
        unit = unit_of(name, part.cfg)
        if unit is None or unit in range(1, 3):
            assert torch.equal(p, params[name]), name  # the LoRA merged into the units it loaded
        else:
            assert p.is_meta, name
    assert any(unit_of(n, part.cfg) == 0 for n, _ in part.named_parameters())
    # Random weights (benchmarks) are built whole, then the other units are dropped.
    from liveavatar_core.loading import drop_other_layers, plan_for_device
    from liveavatar_core.synthetic import TINY_DIT, RandomWeights, random_dit

    dit = random_dit(RandomWeights(TINY_DIT), "fp32", "sdpa", "cpu")
    drop_other_layers(dit, range(3, 4), plan_for_device(TINY_DIT, "cpu", precision="fp32"))
    assert all(p.is_meta == (unit_of(n, dit.cfg) in (0, 1, 2)) for n, p in dit.named_parameters())
