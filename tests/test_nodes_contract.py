"""Node contract: ids, types, tooltips, categories, and the frozen widget order."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from tests.test_nodes_support import load_pack, models_tree, pack_module

SNAPSHOT = Path(__file__).with_name("test_nodes_widgets.json")
BUILTIN_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "IMAGE", "AUDIO", "VIDEO", "MASK"}


@pytest.fixture(scope="module")
def pack(tmp_path_factory, fixtures):
    pack = load_pack()
    root = tmp_path_factory.mktemp("comfy")
    pack_module(pack, "nodes.host").use_standalone(models_tree(root, fixtures), root / "output")
    return pack


def signature(cls) -> dict:
    """What a saved workflow depends on: input names in order, and output types."""
    spec = cls.INPUT_TYPES()
    return {"required": list(spec.get("required", {})), "optional": list(spec.get("optional", {})),
            "outputs": list(cls.RETURN_TYPES)}


def test_pack_registers_every_node_without_import_errors(pack):
    nodes = pack_module(pack, "nodes")
    assert nodes.IMPORT_ERRORS == {}
    assert set(pack.NODE_CLASS_MAPPINGS) == set(json.loads(SNAPSHOT.read_text()))
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    assert pack.WEB_DIRECTORY == "./web"
    assert (Path(pack.__file__).parent / pack.WEB_DIRECTORY).is_dir()


@pytest.mark.parametrize("node_id", sorted(json.loads(SNAPSHOT.read_text())))
def test_node_contract(pack, node_id):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("LiveAvatar")
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Live Avatar ")
    assert cls.CATEGORY.startswith("LiveAvatar/")
    assert cls.DESCRIPTION.strip()
    assert callable(getattr(cls, cls.FUNCTION))
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for name, entry in {**spec.get("required", {}), **spec.get("optional", {})}.items():
        kind, options = entry
        assert options.get("tooltip", "").strip(), f"{node_id}.{name} has no tooltip"
        if isinstance(kind, list):
            assert kind, f"{node_id}.{name}: empty choice list with the fixture models present"
            assert options.get("default", kind[0]) in kind
        else:
            assert kind in BUILTIN_TYPES or kind.startswith("LIVEAVATAR_"), f"{node_id}.{name}: type {kind}"
    assert isinstance(cls.RETURN_TYPES, tuple)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert all(t in BUILTIN_TYPES or t.startswith("LIVEAVATAR_") for t in cls.RETURN_TYPES)
    check = getattr(cls, "VALIDATE_INPUTS", None)
    if check is not None:
        params = set(inspect.signature(check).parameters)
        assert params <= set(spec["required"]) | set(spec.get("optional", {})) | set(spec.get("hidden", {}))


def test_custom_types_have_one_producer_and_a_consumer(pack):
    produced, consumed = {}, set()
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        for t in cls.RETURN_TYPES:
            if t.startswith("LIVEAVATAR_"):
                produced.setdefault(t, []).append(node_id)
        for kind, _ in cls.INPUT_TYPES()["required"].values():
            if isinstance(kind, str) and kind.startswith("LIVEAVATAR_"):
                consumed.add(kind)
    assert all(len(v) == 1 for v in produced.values()), produced
    assert set(produced) == consumed


@pytest.mark.parametrize("node_id", sorted(json.loads(SNAPSHOT.read_text())))
def test_widget_order_is_frozen(pack, node_id):
    """Workflows store widget values by position: existing inputs never move, new ones go last."""
    frozen = json.loads(SNAPSHOT.read_text())[node_id]
    now = signature(pack.NODE_CLASS_MAPPINGS[node_id])
    combined_frozen = frozen["required"] + frozen["optional"]
    combined_now = now["required"] + now["optional"]
    assert combined_now[: len(combined_frozen)] == combined_frozen, "inputs were reordered, renamed or inserted"
    assert now["required"][: len(frozen["required"])] == frozen["required"]
    assert now["outputs"][: len(frozen["outputs"])] == frozen["outputs"], "outputs were reordered"


def test_model_choices_name_the_official_layout(pack):
    loader = pack.NODE_CLASS_MAPPINGS["LiveAvatarModelLoader"].INPUT_TYPES()["required"]
    assert "liveavatar:Wan2.2-S2V-14B" in loader["dit"][0]
    assert "liveavatar:Wan2.2-S2V-14B" in loader["vae"][0]
    assert loader["lora"][0][0] == "none"
    assert "liveavatar:LiveAvatar/liveavatar.safetensors" in loader["lora"][0]


def test_queue_time_validation_names_the_input(pack):
    """Each problem is one InputError naming the input at fault (ComfyUI reports a raised error once,
    a returned string once per input the method takes)."""
    errors = pack_module(pack, "liveavatar_core.errors")
    sampler = pack.NODE_CLASS_MAPPINGS["LiveAvatarSampler"]
    good = dict(size="704*384", custom_width=704, custom_height=384, seed=1, num_clips=0, frames_per_clip=48,
                sample_steps=4, mode="streaming", ref_offset_mode="default", ref_offset=30, online_decode=False)
    assert sampler.VALIDATE_INPUTS(**good) is True
    assert sampler.VALIDATE_INPUTS(**good, audio_frames_per_clip=48) is True
    for change, name in ((dict(frames_per_clip=50), "frames_per_clip"), (dict(mode="offline"), "mode"),
                         (dict(mode="official", sample_steps=8), "steps"),
                         (dict(online_decode=True), "online_decode"),
                         (dict(size="custom", custom_width=32, custom_height=32), "custom_width"),
                         (dict(audio_frames_per_clip=24), "frames_per_clip")):
        with pytest.raises(errors.InputError, match=rf"^{name}: "):
            sampler.VALIDATE_INPUTS(**{**good, **change})
    loader = pack.NODE_CLASS_MAPPINGS["LiveAvatarModelLoader"]
    assert loader.VALIDATE_INPUTS("bf16", "cpu", "same as DiT") is True
    assert loader.VALIDATE_INPUTS("bf16", "cpu", "cpu", kv_cache_dtype="fp8") is True
    assert loader.VALIDATE_INPUTS("fp32", "cpu", "cpu", parallel="steps", gpus="cpu,cpu", shard="fsdp") is True
    for args, kwargs, name in ((("fp8", "cpu", "cpu"), {}, "fp8"), (("bf16", "cuda:7", "cpu"), {}, "dit_device"),
                               (("bf16", "cpu", "tpu"), {}, "vae_device"),
                               (("fp32", "cpu", "cpu"), dict(kv_cache_dtype="fp8"), "kv_cache_dtype"),
                               (("bf16", "cpu", "cpu"), dict(offload="everything"), "offload"),
                               (("bf16", "cpu", "cpu"), dict(shard="fsdp"), "shard"),
                               (("fp32", "cpu", "cpu"), dict(parallel="layers", gpus="cpu,cpu", shard="fsdp"),
                                "shard")):
        with pytest.raises(errors.InputError, match=rf"^{name}"):
            loader.VALIDATE_INPUTS(*args, **kwargs)


def test_frames_per_clip_mismatch_is_marked_for_the_sampler(pack):
    """The on-prompt handler hands a differing Audio Encode value to the Sampler's hidden input and
    leaves agreeing (or linked) prompts untouched."""
    checks = pack_module(pack, "nodes.queue_checks")
    prompt = {"5": {"class_type": "LiveAvatarAudioEncode", "inputs": {"frames_per_clip": 24}},
              "6": {"class_type": "LiveAvatarSampler", "inputs": {"audio_features": ["5", 0], "frames_per_clip": 48}}}
    marked = checks.mark_frames_per_clip_mismatch({"prompt": json.loads(json.dumps(prompt))})["prompt"]
    assert marked["6"]["inputs"][checks.AUDIO_FRAMES_PER_CLIP] == 24
    assert checks.AUDIO_FRAMES_PER_CLIP in pack.NODE_CLASS_MAPPINGS["LiveAvatarSampler"].INPUT_TYPES()["hidden"]
    for same in (48, ["9", 0]):
        prompt["5"]["inputs"]["frames_per_clip"] = same
        assert checks.mark_frames_per_clip_mismatch({"prompt": json.loads(json.dumps(prompt))})["prompt"] == prompt


def test_missing_model_file_names_the_input_and_folder(pack, tmp_path):
    errors = pack_module(pack, "liveavatar_core.errors")
    loader = pack.NODE_CLASS_MAPPINGS["LiveAvatarModelLoader"]()
    with pytest.raises(errors.InputError, match=r"^dit: 'missing\.safetensors' is not in models/diffusion_models"):
        loader.load("missing.safetensors", "none", "liveavatar:Wan2.2-S2V-14B", "fp32", "sdpa", "cpu", "cpu")
    with pytest.raises(errors.InputError, match=r"^lora: .*models/liveavatar"):
        loader.load("liveavatar:Wan2.2-S2V-14B", "liveavatar:nope.safetensors", "liveavatar:Wan2.2-S2V-14B",
                    "fp32", "sdpa", "cpu", "cpu")
    with pytest.raises(errors.InputError, match=r"^vae: .* is not in models/vae"):
        loader.load("liveavatar:Wan2.2-S2V-14B", "none", "../../etc/passwd", "fp32", "sdpa", "cpu", "cpu")


def test_size_tooltip_states_the_area_rule_and_loader_uses_the_planner_names(pack):
    """The size is an area (orientation from the image, never upscaled), said where users pick it;
    the loader's precision and KV cache choices are the planner's own names."""
    sampler = pack.NODE_CLASS_MAPPINGS["LiveAvatarSampler"].INPUT_TYPES()["required"]["size"][1]["tooltip"]
    assert pack_module(pack, "liveavatar_core.encoders.image").SIZE_RULE in sampler
    assert "128x72" in sampler and "never upscaled" in sampler
    loader = pack.NODE_CLASS_MAPPINGS["LiveAvatarModelLoader"].INPUT_TYPES()
    plan = pack_module(pack, "liveavatar_core.plan")
    assert tuple(loader["required"]["precision"][0]) == plan.PRECISIONS
    assert tuple(loader["optional"]["kv_cache_dtype"][0]) == plan.KV_CACHE_DTYPES
    assert "checked again at the sampler's real size" in loader["optional"]["offload"][1]["tooltip"]
