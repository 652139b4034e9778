"""Pure-PyTorch core of the Live Avatar node pack (Alibaba Quark, arXiv 2512.04677).

Owns weights, the causal S2V DiT, sampling, placement and video I/O. Never imports ComfyUI.
"""

__version__ = "0.1.0"
