"""ComfyUI nodes of the Live Avatar pack (thin wrappers over liveavatar_core).

Each node module is imported on its own: if one needs a package that is missing, the others still
register and the log says what to install, instead of ComfyUI hiding the whole pack.
"""

import importlib
import logging

from . import examples, host, queue_checks

log = logging.getLogger("liveavatar")

# node id -> (module, class name, display name)
_NODES = {
    "LiveAvatarModelLoader": ("loader", "LiveAvatarModelLoader", "Live Avatar Model Loader"),
    "LiveAvatarTextEncode": ("encoders", "LiveAvatarTextEncode", "Live Avatar Text Encode"),
    "LiveAvatarAudioEncode": ("encoders", "LiveAvatarAudioEncode", "Live Avatar Audio Encode"),
    "LiveAvatarSampler": ("sampler", "LiveAvatarSampler", "Live Avatar Sampler"),
    "LiveAvatarVideoWriter": ("writer", "LiveAvatarVideoWriter", "Live Avatar Video Writer"),
    "LiveAvatarReleaseGPUs": ("release", "LiveAvatarReleaseGPUs", "Live Avatar Release GPUs"),
    "LiveAvatarLiveSession": ("live", "LiveAvatarLiveSession", "Live Avatar Live Session"),
}

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
IMPORT_ERRORS = {}

for _node_id, (_module, _cls, _label) in _NODES.items():
    try:
        NODE_CLASS_MAPPINGS[_node_id] = getattr(importlib.import_module(f".{_module}", __name__), _cls)
        NODE_DISPLAY_NAME_MAPPINGS[_node_id] = _label
    except ImportError as _exc:
        IMPORT_ERRORS[_node_id] = str(_exc)
        log.error("Live Avatar: node %s is unavailable: %s. Install the pack's requirements.txt "
                  "(pip install -r requirements.txt) and restart ComfyUI.", _node_id, _exc)

host.register_model_folder()
queue_checks.register()
if "LiveAvatarLiveSession" in NODE_CLASS_MAPPINGS:
    importlib.import_module(".live", __name__).register_route()
examples.install_example_inputs()
