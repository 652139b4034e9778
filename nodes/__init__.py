"""ComfyUI nodes of the Live Avatar pack (thin wrappers over liveavatar_core)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
