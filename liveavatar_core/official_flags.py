"""The official scripts' flags on our command line (minimal_inference/s2v_streaming_interact.py).

Every flag the official generate scripts pass, and every other flag of that script, is known here:
mapped to ours (`--t5_cpu`, `--save_dir`, `--base_seed -1`), accepted where the official code itself
ignores it or where it asks for what we do anyway (`--sample_guide_scale 0`, `--num_gpus_dit 1`,
`--convert_model_dtype`), or refused with the reason and the fix. Copying an official command line
therefore never ends in argparse's "unrecognized arguments". The official five-GPU command
(`--num_gpus_dit 4 --enable_vae_parallel`) maps to `--devices cuda:0,...,cuda:3 --vae_gpu cuda:4`.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

from .errors import InputError

log = logging.getLogger("liveavatar")

# Official flags with no effect in the official code either (spec/pipeline.md 7, 8.14).
_IGNORED_STORE_TRUE = ("convert_model_dtype", "single_gpu", "start_from_ref", "drop_motion_noisy", "use_dataset",
                       "using_merged_ckpt")


def add_official_flags(parser: argparse.ArgumentParser) -> None:
    """Add the official-only flags to a `generate` / `plan` parser."""
    g = parser.add_argument_group("flags of the official scripts", "accepted so that official command lines run; "
                                  "see each flag for what it does here")
    g.add_argument("--task", default="s2v-14B", help="must be s2v-14B (the only model Live Avatar uses)")
    g.add_argument("--sample_guide_scale", type=float, default=0.0,
                   help="0 only: the distilled model runs without classifier-free guidance, and the official "
                        "pipeline never applies guidance whatever the value")
    g.add_argument("--sample_solver", default="euler", help="euler only (the schedule the model was distilled for)")
    g.add_argument("--sample_shift", type=float, help="3 only (the official code always uses 3)")
    g.add_argument("--load_lora", action="store_true", help="accepted: the LoRA is merged whenever --lora_path_dmd "
                   "is given")
    g.add_argument("--training_config", help="accepted and unused: the LoRA's rank and alpha are read from the file")
    g.add_argument("--t5_cpu", action="store_true", help="run the umT5 text encoder on the CPU (bf16)")
    g.add_argument("--save_dir", type=Path, help="folder for the video when --save_file is not given")
    g.add_argument("--num_gpus_dit", type=int, default=1, help="DiT GPUs of the step pipeline: the same as "
                   "--devices cuda:0,...,cuda:N-1 (1 to the step count)")
    g.add_argument("--ulysses_size", type=int, default=1, help="1 only (the official code refuses other values too)")
    g.add_argument("--enable_vae_parallel", action="store_true", help="the VAE on the GPU after the DiT GPUs: the "
                   "same as --vae_gpu cuda:N")
    g.add_argument("--t5_fsdp", action="store_true", help="accepted: umT5 runs once, before the DiT loads, and leaves "
                   "the GPU (or runs on the CPU with --t5_cpu), so it needs no sharding")
    g.add_argument("--dit_fsdp", action="store_true", help="the same as --shard fsdp: the DiT's blocks sharded over "
                   "the GPUs of the step pipeline")
    g.add_argument("--frame_num", type=int, help="accepted and unused, as in the official code (see --infer_frames)")
    g.add_argument("--lora_path", help="refused: unused by the official code; the Live Avatar LoRA is --lora_path_dmd")
    g.add_argument("--pose_video", help="not supported")
    g.add_argument("--use_prompt_extend", action="store_true", help="not supported (LLM prompt rewriting)")
    g.add_argument("--prompt_extend_method", help="not supported")
    g.add_argument("--prompt_extend_model", help="not supported")
    g.add_argument("--prompt_extend_target_lang", help="not supported")
    g.add_argument("--enable_tts", action="store_true", help="not supported (text to speech)")
    for name in ("tts_prompt_audio", "tts_prompt_text", "tts_text"):
        g.add_argument(f"--{name}", help="not supported (text to speech)")
    g.add_argument("--dataset_sample_idx", type=int, help="accepted and unused, as in the official code")
    for name in _IGNORED_STORE_TRUE:
        g.add_argument(f"--{name}", action="store_true", help="accepted and unused, as in the official code")


def _map_gpu_flags(args: argparse.Namespace) -> None:
    """--num_gpus_dit N / --enable_vae_parallel as --devices / --vae_gpu (refused beside those)."""
    n = args.num_gpus_dit
    if n < 1:
        raise InputError("num_gpus_dit", f"must be at least 1, got {n}.", "use 1 to 4 (4 is the official layout).")
    if n == 1 and not args.enable_vae_parallel:
        return
    if args.devices is not None or args.vae_gpu is not None:
        raise InputError("num_gpus_dit", "--num_gpus_dit/--enable_vae_parallel and --devices/--vae_gpu both say "
                         "which GPUs to use.", "keep one pair: the official flags or --devices/--vae_gpu.")
    args.devices = ",".join(f"cuda:{i}" for i in range(n))
    if args.enable_vae_parallel:
        args.vae_gpu = f"cuda:{n}"


def apply_official_flags(args: argparse.Namespace, default_save_file: Path) -> None:
    """Refuse what cannot run, map what can (in place on `args`), log what is ignored."""
    if args.task != "s2v-14B":
        raise InputError("task", f"'{args.task}' is not the Live Avatar model.", "use --task s2v-14B (or leave it out).")
    if args.sample_guide_scale < 0:
        raise InputError("sample_guide_scale", f"must not be negative, got {args.sample_guide_scale}.", "use 0.")
    if args.sample_guide_scale > 0:
        raise InputError("sample_guide_scale", f"{args.sample_guide_scale} asks for classifier-free guidance, which "
                         "the 4-step distilled model was made without: the official causal pipeline accepts the "
                         "flag but never applies guidance (it encodes the negative prompt and drops it), so any "
                         "value gives the video of 0. Running guidance here would double the cost per step for a "
                         "picture the model was not trained to give.", "use --sample_guide_scale 0 (or leave it out).")
    if args.sample_solver != "euler":
        raise InputError("sample_solver", f"'{args.sample_solver}' is not available: the model was distilled for "
                         "the 4-step Euler flow-matching schedule (the official code raises for unipc and dpm++ too).",
                         "use --sample_solver euler (or leave it out).")
    if args.sample_shift is not None and args.sample_shift != 3:
        raise InputError("sample_shift", f"{args.sample_shift} differs from the distilled schedule's shift 3, which "
                         "the official code uses whatever this flag says.", "leave --sample_shift out (or pass 3).")
    _map_gpu_flags(args)
    if args.ulysses_size != 1:
        raise InputError("ulysses_size", f"{args.ulysses_size}: sequence parallelism is not supported (the official "
                         "Live Avatar code refuses it too).", "use --ulysses_size 1 (or leave it out).")
    if args.dit_fsdp:
        args.shard = "fsdp"
    if args.lora_path:
        raise InputError("lora_path", "the official code never reads --lora_path; the Live Avatar LoRA is given with "
                         "--lora_path_dmd.", f"pass --lora_path_dmd {args.lora_path}.")
    if args.load_lora and not args.lora_path_dmd:
        raise InputError("load_lora", "--load_lora was given without the LoRA file.",
                         "add --lora_path_dmd path/to/liveavatar.safetensors.")
    if args.pose_video:
        raise InputError("pose_video", "pose-driven generation is not supported.", "leave --pose_video out.")
    if args.use_prompt_extend:
        raise InputError("use_prompt_extend", "prompt rewriting with a language model is not supported.",
                         "write the full prompt in --prompt.")
    if args.enable_tts or args.tts_text or args.tts_prompt_audio or args.tts_prompt_text:
        raise InputError("enable_tts", "text to speech is not supported.", "pass recorded speech with --audio.")
    if args.save_dir is not None and args.save_file is None:
        args.save_file = args.save_dir / default_save_file.name
    if args.base_seed < 0:  # the official -1: a random seed, said so that the run can be repeated
        args.base_seed = random.SystemRandom().randrange(2 ** 31)
        log.info("--base_seed -1: using the random seed %d (pass --base_seed %d to repeat this video)",
                 args.base_seed, args.base_seed)
    ignored = [f"--{n}" for n in (*_IGNORED_STORE_TRUE, "t5_fsdp") if getattr(args, n)]
    ignored += [f"--{n}" for n in ("training_config", "frame_num", "dataset_sample_idx") if getattr(args, n) is not None]
    if ignored:
        log.info("accepted and not needed here (the official code ignores them too, or reads the LoRA's settings "
                 "from its file): %s", ", ".join(ignored))
