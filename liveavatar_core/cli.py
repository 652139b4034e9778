"""Command line: `python -m liveavatar_core {generate,plan,inspect,demo}`.

`generate` takes the official flag names (the official scripts' other flags are mapped, accepted
or refused with the reason: official_flags.py) and validates every input, and the memory plan at
the real output size, before loading anything. `plan` runs that validation alone and prints the
placement and memory per device (`--json` for scripts), reading only config.json and headers.

An interrupted `generate` (Ctrl-C, SIGTERM, an error, a full disk) leaves a playable MP4 of every
finished block and, where there is room, a resume file next to it (`<video>.resume`); the same
command plus `--resume <video>.resume` completes that MP4 as if it had never stopped.

`demo` writes a tiny synthetic checkpoint in the official layout and runs the whole pipeline on it
(CPU, seconds), producing a real MP4 with audio.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .encoders.image import DEFAULT_SIZE, SIZE_PRESETS, SIZE_RULE
from .errors import InputError as LiveAvatarInputError
from .errors import LiveAvatarError
from .health import DEFAULT_HEALTH, HEALTH_MODES, health_paths
from .official_flags import add_official_flags, apply_official_flags
from .ops.attention import attention_backends
from .parallel.layout import LAYOUTS, SHARDS
from .plan import KV_CACHE_DTYPES, PRECISIONS

if TYPE_CHECKING:
    from .preflight import RunRequest

log = logging.getLogger("liveavatar")

# Where `generate` writes without --save_file: a new numbered file each run.
DEFAULT_SAVE_FILE = Path("output/liveavatar.mp4")


def _positive(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return n


def _str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (use True or False)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m liveavatar_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video from an image, an audio file and a prompt")
    _generate_args(gen)
    plan = sub.add_parser("plan", help="validate generate's arguments and print the placement and memory per "
                          "device, without loading any weight")
    _generate_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (output_size, devices, ...)")

    ins = sub.add_parser("inspect", help="say what weight files or folders hold (exit status 1 when one holds "
                                         "nothing recognised, lacks parts or is damaged)")
    ins.add_argument("paths", nargs="+", type=Path)

    demo = sub.add_parser("demo", help="run the whole pipeline on a tiny synthetic checkpoint (CPU)")
    demo.add_argument("--save_file", type=Path, default=Path("output/liveavatar_demo.mp4"))
    demo.add_argument("--workdir", type=Path, help="where to write the tiny checkpoint (default: a temp dir)")
    demo.add_argument("--num_clip", type=_positive, default=0, help="clips to generate (0 = as long as the audio)")
    demo.add_argument("--mode", choices=["streaming", "official"], default="streaming")
    demo.add_argument("--audio_seconds", type=float, default=3.0)

    serve = sub.add_parser("serve", help="serve live sessions over a WebSocket (/liveavatar/ws): audio in, the "
                           "avatar's video out as it is made (README 'Live sessions')")
    serve.add_argument("--ckpt_dir", required=True, help="official Wan2.2-S2V-14B folder")
    serve.add_argument("--lora_path_dmd", help="liveavatar.safetensors")
    serve.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    serve.add_argument("--precision", choices=PRECISIONS, default="bf16")
    serve.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    serve.add_argument("--port", type=int, default=8189, help="0: any free port")
    serve.add_argument("--token", help="what clients must send in session.start (default: a new random one)")
    serve.add_argument("--idle_s", type=float, default=300.0, help="end a session after this long without a message")
    return parser


def _generate_args(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--ckpt_dir", required=True, help="official Wan2.2-S2V-14B folder")
    gen.add_argument("--lora_path_dmd", help="liveavatar.safetensors, downloaded from Quark-Vision/Live-Avatar")
    _common(gen)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--fp8", action="store_true", help="FP8 GEMMs (Ada/Hopper GPUs); the same as --precision fp8")
    gen.add_argument("--precision", choices=PRECISIONS, default="bf16",
                     help="bf16 (official), fp8 (FP8 GEMMs), fp32 (CPU parity runs)")
    gen.add_argument("--attention", default="sdpa", help=f"attention backend: {', '.join(attention_backends())}")
    gen.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                     help="regional compilation of the DiT blocks (auto: on for CUDA with Triton); the first "
                          "call at each size compiles, later runs reuse the on-disk cache")
    gen.add_argument("--offload_model", type=_str2bool, default=False,
                     help="True: let the run planner pick the cheapest placement that fits this GPU "
                          "(KV caches streamed from host memory, then block swap); encoders always run "
                          "before the DiT is loaded. On a CPU-only machine there is nothing to offload")
    gen.add_argument("--offload_kv_cache", action="store_true",
                     help="keep the 4 step KV caches in pinned host memory, streamed layer by layer")
    gen.add_argument("--blocks_on_gpu", type=int, help="block swap: DiT blocks kept resident on the GPU")
    gen.add_argument("--kv_cache_dtype", choices=KV_CACHE_DTYPES, default="auto",
                     help="auto: the step KV caches in the compute dtype; fp8: e4m3 with a scale per head row "
                          "(half the memory and streamed bytes, slightly different results)")
    gen.add_argument("--devices", help="several GPUs, one DiT process each, the work laid over them (--layout): "
                     "a list such as cuda:0,cuda:1 (or 0,1; cpu,cpu runs CPU processes), or 'auto' for every GPU "
                     "(step layout with 5 GPUs: 4 for the DiT + 1 for the VAE, the official layout)")
    gen.add_argument("--vae_gpu", help="a GPU for the VAE alone in a parallel run (default: the last DiT GPU)")
    gen.add_argument("--layout", choices=LAYOUTS, default="steps",
                     help="how a parallel run divides the work: steps (each GPU owns whole denoising steps; at most "
                          "4 DiT GPUs + 1 VAE GPU) or layers (each GPU owns a share of the layers of every step "
                          "and holds only their weights and caches: for 24-48 GB cards, any count up to 40)")
    gen.add_argument("--shard", choices=SHARDS, default="none",
                     help="fsdp: the DiT's blocks sharded over the GPUs of a step layout run (each holds a share and "
                          "gathers every block per call over the GPU link: for cards too small for a whole model, "
                          "fast only over NVLink); none: whole weights on every GPU")
    gen.add_argument("--attach", help="HOST:PORT: start no workers; wait there for ranks launched elsewhere "
                     "(LIVEAVATAR_CONTROL=HOST:PORT torchrun ... -m liveavatar_core.parallel.worker, on this or other "
                     "machines), which present the authkey in LIVEAVATAR_AUTHKEY (set it on both sides)")
    gen.add_argument("--gpu_count", type=int, help="GPUs that are not visible here: plan for them (plan), or the "
                     "GPUs of attached ranks (generate --attach); --devices then names them cuda:0..cuda:N-1")
    gen.add_argument("--gpu_memory_gib", type=float, help="memory of each of those GPUs, as the driver reports it")
    gen.add_argument("--gpu_model", default="", help="their model, for the speed estimate (e.g. 'RTX 4090'; "
                     "default: guessed from the memory)")
    gen.add_argument("--resume", type=Path, help="continue an interrupted run from its resume file (written next "
                     "to its video as <save_file>.resume); the other arguments must be those of that run")
    add_official_flags(gen)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="reference image")
    p.add_argument("--audio", required=True, help="audio file (wav, flac, mp3, ogg, m4a)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--size", default=DEFAULT_SIZE, help=f"target pixel area W*H (or WxH), e.g. {DEFAULT_SIZE}; "
                   f"{SIZE_RULE}. Official presets: {', '.join(SIZE_PRESETS)}")
    p.add_argument("--num_clip", type=_positive, default=0, help="clips to generate (0 = as long as the audio)")
    p.add_argument("--infer_frames", type=int, default=48, help="video frames per clip (multiple of 12)")
    p.add_argument("--sample_steps", type=int, default=4, help="denoising steps per block; the distilled model "
                   "was made for 4")
    p.add_argument("--base_seed", type=int, default=420, help="noise seed (-1: a random one, as officially)")
    p.add_argument("--mode", choices=["streaming", "official"], default="streaming")
    p.add_argument("--enable_online_decode", action="store_true",
                   help="official mode only: Mode S+ (sink refreshed from clip 0 before clip 1)")
    p.add_argument("--health", choices=HEALTH_MODES, default=DEFAULT_HEALTH,
                   help="per-block health checks (colour drift, face, identity, lip-sync offset, seams, freezes, "
                   "black frames) into NAME.health.jsonl and NAME.health.png beside the video: auto (warn where "
                   "OpenCV can run them, else off with a warning); off; warn (log alarms); stop (end the run "
                   "after the block in flight when an alarm is raised, resumable)")
    p.add_argument("--save_file", type=Path,
                   help=f"the MP4 to write (default: a new numbered {DEFAULT_SAVE_FILE.parent}/"
                        f"{DEFAULT_SAVE_FILE.stem}_NNNNN.mp4); an existing file is never overwritten (a numbered "
                        "name next to it is used) and an existing folder gets a numbered file inside it")


def request_from_args(args: argparse.Namespace) -> "RunRequest":
    """The `RunRequest` of parsed `generate` / `plan` arguments (official flags applied first)."""
    from .preflight import RunRequest

    apply_official_flags(args, DEFAULT_SAVE_FILE)
    return RunRequest(Path(args.ckpt_dir), args.image, args.audio, args.prompt,
                      lora=Path(args.lora_path_dmd) if args.lora_path_dmd else None, size=args.size,
                      num_clip=args.num_clip, infer_frames=args.infer_frames, sample_steps=args.sample_steps,
                      seed=args.base_seed, mode=args.mode, online_decode=args.enable_online_decode,
                      device=args.device, precision="fp8" if args.fp8 else args.precision,
                      attention=args.attention,
                      offload="block_swap" if args.blocks_on_gpu is not None
                      else "auto" if args.offload_model else "none",
                      blocks_on_gpu=args.blocks_on_gpu,
                      kv_cache_location="cpu" if args.offload_kv_cache else "gpu",
                      kv_cache_dtype=args.kv_cache_dtype, compile=args.compile, t5_cpu=args.t5_cpu,
                      devices=_devices_arg(args.devices), vae_gpu=args.vae_gpu, layout=args.layout,
                      shard=args.shard, attach=_address(args.attach), health=args.health)


def _address(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise LiveAvatarInputError("attach", f"'{value}' is not HOST:PORT.", "give an address such as 0.0.0.0:29600.")
    return host, int(port)


def hardware_from_args(args: argparse.Namespace):
    """The GPUs `--gpu_count/--gpu_memory_gib/--gpu_model` describe (None: the GPUs present); a
    run planned for them uses all of them unless `--devices` (or the official flags) say otherwise."""
    if args.gpu_count is None and args.gpu_memory_gib is None:
        return None
    from .parallel.planner import hypothetical_devices

    return hypothetical_devices(args.gpu_count, args.gpu_memory_gib, args.gpu_model)


def _devices_arg(value: str | None) -> tuple[str, ...] | str:
    if value is None:
        return ()
    return "auto" if value.strip() == "auto" else tuple(v.strip() for v in value.split(",") if v.strip())


def run_generation(req: RunRequest, save_file: Path | None, resume: Path | None = None, hardware=None) -> Path:
    """Validate `req` (`preflight`), load the models, stream the video into `save_file`.

    save_file: the MP4 (see `video.naming.output_target`); None: a new numbered DEFAULT_SAVE_FILE.
    resume: the resume file of an interrupted run with these arguments; its MP4 is completed
    (wherever `save_file` points). Any run that stops early saves `<video>.resume` (or `resume`).
    hardware: the GPUs of attached ranks (`--attach`), which this machine cannot see.
    """
    from dataclasses import asdict

    from .encoders.audio import AudioEncoder
    from .encoders.audio_stream import audio_identity
    from .encoders.image import preprocess_reference
    from .encoders.placement import audio_encoder_placement, text_encoder_placement
    from .encoders.text import TextEncoder
    from .loading import load_generator
    from .preflight import preflight
    from .resume import check_resume_state, input_fingerprint, load_resume_state, partial_video
    from .video.naming import output_target

    # 1. Every input, and the memory plan at the real output size, checked before any weight is read.
    pre = preflight(req, hardware=hardware)
    pre.log()
    req = pre.request  # as planned (described GPUs without --devices: all of them)
    settings, folder = pre.settings, pre.folder
    state = target = None
    if resume is not None:
        state = load_resume_state(resume)
        check_resume_state(state, asdict(settings))
        out = partial_video(state)
        log.info("resuming %s from %s", out, resume)
    else:
        target = output_target(save_file, DEFAULT_SAVE_FILE)
        if target.note:
            log.warning("save_file: %s", target.note)
        out = target.path
    resume_file = resume or out.with_name(out.name + ".resume")

    # 2. Encoders (each used once here: loaded where it runs, then dropped), then the generator.
    t0 = time.perf_counter()
    # Streaming mode keeps wav2vec2 for its windowed encoding, which runs while the blocks are sampled;
    # --t5_cpu: umT5 encodes on the CPU, as the official flag does.
    text_at = text_encoder_placement(pre.text_device, req.precision)
    audio_at = audio_encoder_placement(pre.device, req.precision)
    text = TextEncoder.from_pretrained(folder.t5, device=text_at.run_on, dtype=text_at.dtype).encode(req.prompt)
    features = AudioEncoder.from_pretrained(folder.wav2vec2, device=audio_at.run_on, dtype=audio_at.dtype).prepare(
        req.audio, frames_per_clip=req.infer_frames, num_clips=req.num_clip or None).features(req.mode)
    if state is not None:  # the prompt, audio and image are known now; the model only after loading it
        check_resume_state(state, fingerprint=input_fingerprint(text=text, audio=audio_identity(features),
                                                                reference=preprocess_reference(req.image, req.size)[0]))
    if req.parallel:
        from .parallel.remote import load_parallel

        gc.collect()  # the text encoder's GPU memory goes back to the driver: a worker needs it
        torch.cuda.empty_cache()
        model = load_parallel(folder.dit, folder.vae, req.lora, layout=pre.plan.layout, precision=req.precision,
                              attention=req.attention, compile=req.compile, kv_cache_dtype=req.kv_cache_dtype,
                              plan=pre.plan, attach=req.attach, authkey=pre.authkey, shard=req.shard)
        text = text.cpu()
    else:
        model = load_generator(folder.dit, folder.vae, req.lora, precision=req.precision, attention=req.attention,
                               dit_device=req.device, offload=req.offload, blocks_on_gpu=req.blocks_on_gpu,
                               kv_cache_location=req.kv_cache_location, kv_cache_dtype=req.kv_cache_dtype,
                               plan_size=pre.output_size, frames_per_clip=req.infer_frames, steps=req.sample_steps,
                               compile=req.compile, plan=pre.plan)
        text = text.to(req.device)
    log.info("loaded in %.1f s: %s", time.perf_counter() - t0, model.description)
    try:
        return _stream_to_file(model, text, features, req, settings, state, target, out, resume_file)
    finally:
        if req.parallel:
            model.close()


def _stream_to_file(model, text, features, req: RunRequest, settings, state, target, out: Path,
                    resume_file: Path) -> Path:
    """Stream: every block is decoded and appended to the MP4 as soon as it is sampled."""
    from .pipeline import generate, write_mp4

    stream = generate(model, text, features, req.image, settings, resume_from=state)
    frames = stream.total_frames  # None: streamed audio whose length is known only once read
    log.info("output %dx%d, %s clips, %s frames (%s s) -> %s", stream.width, stream.height, stream.num_clips,
             frames, "?" if frames is None else f"{frames / stream.fps:.2f}", out)

    def report(chunk):
        s = chunk.stats
        log.info("clip %d block %d: %d frames, %.2f fps, first frame after %.1f s", chunk.clip, chunk.block,
                 s.frames_done, s.fps, s.first_frame_s or 0.0)

    if target is not None:
        target.create_folders()
    try:
        return write_mp4(stream, out, on_chunk=report, resume_path=resume_file, health=req.health)
    except BaseException:
        if resume_file.is_file():
            log.warning("%s plays up to the last finished block; to complete it, run the same command with "
                        "--resume %s", out, resume_file)
        elif target is not None and (removed := target.remove_if_unused(health_paths(out))):
            log.warning("nothing was written: removed %s", ", ".join(map(str, removed)))
        raise


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, systemd, container stops) during `generate`: handled as Ctrl-C is."""


@contextlib.contextmanager
def _stop_signals():
    """SIGTERM raises `Terminated` (once: a second one cannot cut the resume save short), and
    SIGXFSZ is ignored, so a file-size limit ends as a clear write error, not a core dump."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, terminate)}
    if hasattr(signal, "SIGXFSZ"):
        old[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for number, handler in old.items():
            signal.signal(number, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "inspect":
            from .weights.detect import inspect_path

            found = [inspect_path(p) for p in args.paths]
            print("\n".join(f.text for f in found))
            return 0 if all(f.ok for f in found) else 1
        hardware = hardware_from_args(args)
        if hardware is not None and args.attach is None:
            raise LiveAvatarInputError("gpu_count", "--gpu_count/--gpu_memory_gib describe GPUs that are not here, "
                                       "and generate runs on this machine's GPUs.",
                                       "use them with plan, or with generate --attach for ranks launched elsewhere.")
        req = request_from_args(args)
        with _stop_signals():
            path = run_generation(req, args.save_file, resume=args.resume, hardware=hardware)
        print(f"wrote {path}")
        return 0
    except LiveAvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _plan(args) -> int:
    """`plan`: the preflight of `generate`, nothing loaded. The plan is printed whether or not it
    fits (JSON: "fits"); exit 0 when it fits, 2 with the planner's message when it does not."""
    import json

    from .preflight import preflight

    hardware = hardware_from_args(args)
    pre = preflight(request_from_args(args), check_memory=False, hardware=hardware)
    pre.log(table=not args.json)  # on stderr; stdout holds only the JSON
    if args.json:
        print(json.dumps(pre.to_dict(), indent=1))
    pre.plan.validate()
    if not args.json:
        print(f"fits: {pre.plan.placement_words()}; output {pre.output_size[1]}x{pre.output_size[0]} (W x H)")
        if getattr(pre.plan, "fps", None) is not None:  # a parallel plan's speed estimate
            print(f"estimate: {pre.plan.fps:.1f} FPS, first frame after {pre.plan.first_frame_s:.1f} s")
    return 0


def _serve(args) -> int:
    """Load the model and the encoders once, then serve live sessions until interrupted. umT5
    stays on the CPU (a prompt per session, encoded before the session is ready)."""
    from .encoders.audio import AudioEncoder
    from .encoders.placement import audio_encoder_placement, text_encoder_placement
    from .encoders.text import TextEncoder
    from .live.server import LiveEndpoint, run_server
    from .loading import load_generator, official_folder
    from .preflight import check_device

    folder = official_folder(args.ckpt_dir)
    device = check_device(args.device)
    model = load_generator(folder.dit, folder.vae, args.lora_path_dmd, precision=args.precision, dit_device=device,
                           compile=args.compile)
    text_at = text_encoder_placement("cpu", args.precision)
    audio_at = audio_encoder_placement(device, args.precision)
    text = TextEncoder.from_pretrained(folder.t5, device=text_at.run_on, dtype=text_at.dtype)
    audio = AudioEncoder.from_pretrained(folder.wav2vec2, device=audio_at.run_on, dtype=audio_at.dtype)
    endpoint = LiveEndpoint(model, text, audio, token=args.token, idle_s=args.idle_s)

    def ready(url: str) -> None:
        print(f"serving live sessions at {url} (token {endpoint.token})", flush=True)
    with _stop_signals():
        try:
            run_server(endpoint, args.host, args.port, on_ready=ready)
        except Terminated:
            pass
    return 0


def _demo(args) -> int:
    from .preflight import RunRequest
    from .synthetic import write_tiny_checkpoint
    from .video.probe import probe_mp4

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        tiny = write_tiny_checkpoint(root, audio_seconds=args.audio_seconds)
        log.info("tiny synthetic checkpoint written to %s in %.1f s", root, time.perf_counter() - t0)
        args.save_file.parent.mkdir(parents=True, exist_ok=True)
        req = RunRequest(tiny.ckpt_dir, tiny.image, tiny.audio, tiny.prompt, lora=tiny.lora, size="128*128",
                         num_clip=args.num_clip, mode=args.mode, device="cpu", precision="fp32")
        path = run_generation(req, args.save_file)
    info = probe_mp4(path)
    print(f"wrote {path}: {info.frame_count} frames {info.width}x{info.height} at {info.fps} fps, "
          f"{info.duration_s:.2f} s, audio {info.audio_duration_s:.2f} s, "
          f"total {time.perf_counter() - t0:.1f} s")
    return 0
