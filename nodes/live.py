"""Live Session node: holds the loaded model for live sessions on ComfyUI's own server.

The pack registers `/liveavatar/ws` on ComfyUI's server when it is imported; the route serves a
session only while this node runs (it blocks the queue meanwhile, as a long generation does).
The picture and prompt come from the graph; a client pushes audio and receives the video
(README "Live sessions"). ComfyUI's Cancel ends the session and the node.
"""

from __future__ import annotations

import time

from ..liveavatar_core.encoders.image import DEFAULT_SIZE, SIZE_PRESETS
from ..liveavatar_core.live.server import PAGE_PATH, PATH, LiveEndpoint, page
from . import host
from .encoders import TEXT_EMBEDS, wav2vec2, wav2vec2_choices
from .loader import MODEL

POLL_S = 0.25
_current: dict[str, LiveEndpoint] = {}  # the endpoint of the running node, if one runs


class LiveAvatarLiveSession:
    DESCRIPTION = ("Serves live sessions while it runs: a client (the README's, a browser page, a voice "
                   "agent) connects to ws://<this ComfyUI>/liveavatar/ws with the token, pushes speech and "
                   "receives the avatar's video block by block as it is made. Cancel ends it.")
    CATEGORY = "LiveAvatar/live"
    FUNCTION = "serve"
    RETURN_TYPES = ()
    RETURN_NAMES = ()
    OUTPUT_TOOLTIPS = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "From Live Avatar Model Loader (one GPU)."}),
            "text_embeds": (TEXT_EMBEDS, {"tooltip": "The prompt, from Live Avatar Text Encode."}),
            "image": ("IMAGE", {"tooltip": "The reference picture."}),
            "audio_encoder": (wav2vec2_choices(), {"tooltip": "wav2vec2 for the pushed speech."}),
            "device": (list(host.DEVICE_CHOICES), {"default": "auto", "tooltip": "Where wav2vec2 runs."}),
            "size": (list(SIZE_PRESETS), {"default": DEFAULT_SIZE, "tooltip": "Pixel area W*H of the video."}),
            "seed": ("INT", {"default": 420, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": True,
                             "tooltip": "Noise seed of every session (the same seed and audio give the same "
                             "video)."}),
            "token": ("STRING", {"default": "", "tooltip": "What a client must send in session.start; empty: a "
                                 "new random token, shown on the node."}),
            "minutes": ("INT", {"default": 60, "min": 1, "max": 24 * 60, "tooltip": "How long the node serves "
                                "(Cancel ends it earlier)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, device=None):
        if device is not None:
            host.check_device(device, "device")
        return True

    def serve(self, model, text_embeds, image, audio_encoder: str, device: str, size: str, seed: int, token: str,
              minutes: int, unique_id=None):
        endpoint = LiveEndpoint(model, None, wav2vec2(audio_encoder, device), token=token.strip() or None,
                                text=text_embeds, image=image, size=size, seed=seed)
        progress = host.Progress(unique_id)
        where = _server_address()
        progress.status(f"live: open http://{where}{PAGE_PATH}?token={endpoint.token} in a browser, or connect a "
                        f"client to ws://{where}{PATH} with token {endpoint.token}",
                        {"live": {"path": PATH, "page": PAGE_PATH, "token": endpoint.token}})
        _current["endpoint"] = endpoint
        deadline = time.monotonic() + minutes * 60
        try:
            while time.monotonic() < deadline and not host.interrupt_requested():
                time.sleep(POLL_S)
        finally:
            _current.pop("endpoint", None)
            endpoint.stop()
        host.raise_if_interrupted()
        return {"ui": {"text": [f"live sessions served: {endpoint.sessions}"]}}


def _server_address() -> str:
    """host:port ComfyUI listens on (what its own start-up line prints), or a placeholder."""
    try:
        from server import PromptServer
    except ImportError:
        return "<this ComfyUI>"
    server = getattr(PromptServer, "instance", None)
    address, port = getattr(server, "address", None), getattr(server, "port", None)
    if not address or not port:
        return "<this ComfyUI>"
    return f"{'127.0.0.1' if address in ('0.0.0.0', '::') else address}:{port}"


def register_route() -> None:
    """Put `/liveavatar/ws` on ComfyUI's server (at import, before it starts serving)."""
    try:
        from server import PromptServer
    except ImportError:  # plain Python: tests and scripts
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    from aiohttp import web

    async def handle(request):
        endpoint = _current.get("endpoint")
        if endpoint is None:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_json({"type": "error", "code": "no_session", "fatal": True,
                                "message": "no live session is being served: queue a workflow with the Live "
                                           "Avatar Live Session node."})
            await ws.close()
            return ws
        return await endpoint.handle(request)

    server.routes.get(PATH)(handle)
    server.routes.get(PAGE_PATH)(page)
