"""The prompt encoder: official umT5 tokenisation and transformers' `UMT5EncoderModel` (spec 2.9).

A prompt is cleaned (ftfy, HTML unescaped twice, whitespace collapsed), tokenised, `</s>` is
appended, the ids are truncated/padded to `text_len` (512), the encoder runs on all positions
with the padding mask, and the output is trimmed to the real token count: `context [L, 4096]`.
An empty prompt is valid, as in the official code: it encodes to the single token `</s>` (L = 1).
The DiT zero-pads the context back to `text_len` rows itself.
"""

from __future__ import annotations

import html
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError, WeightsError
from ..weights.t5 import TIED_KEY, TOKENIZER_FILES, T5StateDict, load_t5_weights, tokenizer_folder

if TYPE_CHECKING:
    from transformers import UMT5Config, UMT5EncoderModel

logger = logging.getLogger(__name__)

TEXT_LEN = 512  # DiTConfig.text_len of the released model
_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def clean_prompt(text: str) -> str:
    """The official 'whitespace' cleaning: ftfy fix, HTML-unescape twice, collapse whitespace, strip."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptTokenizer:
    """Official tokenisation of one prompt into `input_ids` and `attention_mask`, both `[1, text_len]`.

    `encode` maps cleaned text to ids without special tokens; `</s>` is appended here.
    """

    def __init__(self, encode: Callable[[str], list[int]], eos_id: int, pad_id: int, vocab_size: int,
                 source: str, text_len: int = TEXT_LEN):
        self._encode = encode
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.source = source
        self.text_len = text_len

    @classmethod
    def from_folder(cls, folder: str | Path, text_len: int = TEXT_LEN,
                    input_name: str = "tokenizer_path") -> PromptTokenizer:
        """Load the `tokenizer.json` of a google/umt5-xxl folder (a file inside it also works)."""
        folder = tokenizer_folder(None, folder, input_name)
        from transformers import PreTrainedTokenizerFast

        # The generic fast class runs tokenizer.json as written, as transformers 4.x did for the
        # official code. transformers 5's T5Tokenizer rebuilds the pre-tokenizer (always prepending
        # "▁"), which changes the ids.
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise WeightsError(input_name, f"cannot load the tokenizer in {folder}: {exc}.",
                               f"restore the tokenizer files ({TOKENIZER_FILES}).") from None
        if tok.eos_token_id is None or tok.pad_token_id is None:
            raise WeightsError(input_name, f"the tokenizer in {folder} defines no </s> or <pad> token.",
                               "use the google/umt5-xxl tokenizer folder of the Wan2.2-S2V-14B download.")
        # verbose=False: the over-length case is reported once, by __call__, with the real count.
        return cls(lambda text: tok(text, add_special_tokens=False, verbose=False)["input_ids"],
                   tok.eos_token_id, tok.pad_token_id, len(tok), str(folder), text_len)

    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._encode(clean_prompt(prompt))
        if len(ids) + 1 > self.text_len:
            logger.warning("Prompt has %d tokens; the text encoder keeps the first %d (as the official code "
                           "does) and drops the rest.", len(ids) + 1, self.text_len)
            ids = ids[: self.text_len - 1]
        ids = ids + [self.eos_id]
        n = len(ids)
        input_ids = torch.full((1, self.text_len), self.pad_id, dtype=torch.long)
        input_ids[0, :n] = torch.tensor(ids, dtype=torch.long)
        mask = torch.zeros((1, self.text_len), dtype=torch.long)
        mask[0, :n] = 1
        return input_ids, mask


class TextEncoder:
    """umT5 encoder loaded once; `encode(prompt)` reuses it (and memoises the last few prompts)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PromptTokenizer, description: str,
                 memo_size: int = 4):
        self.model = model
        self.tokenizer = tokenizer
        self.description = description
        self.memo_size = memo_size
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_pretrained(cls, weights_path: str | Path, tokenizer_path: str | Path | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, *,
                        text_len: int = TEXT_LEN, memo_size: int = 4) -> TextEncoder:
        """Load a umT5 encoder file (any format `load_t5_weights` knows) and its tokenizer.

        The tokenizer is `tokenizer_path`, else `google/umt5-xxl/` next to the weights. bf16 is the
        official precision; fp32 is for parity checks. Inputs are validated before any tensor is read.
        """
        device = _check_device(device)
        if dtype not in _DTYPES:
            raise InputError("dtype", f"{dtype} is not supported by the umT5 text encoder (its activations "
                             "overflow float16; the official code runs bf16).",
                             "use torch.bfloat16, or torch.float32 for parity checks.")
        state_dict, config, description = load_t5_weights(weights_path, dtype=dtype)
        tokenizer = _resolve_tokenizer(Path(weights_path), tokenizer_path, text_len)
        if tokenizer.vocab_size > config.vocab_size:
            raise WeightsError("tokenizer_path", f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} "
                               f"tokens but the encoder only {config.vocab_size} embeddings: they belong to "
                               "different models.", "use the tokenizer that ships with this umT5 encoder.")
        model = _build_model(state_dict, config, device)
        logger.info("Text encoder: %s on %s (%s); tokenizer %s", description, device, _DTYPES[dtype],
                    tokenizer.source)
        return cls(model, tokenizer, f"{description}, running {_DTYPES[dtype]}", memo_size)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the encoder (e.g. to CPU between prompts to free GPU memory); returns self."""
        device = _check_device(device)
        if device != self.device:
            self.model.to(device)
            self._memo.clear()
        return self

    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` and `attention_mask`, `[1, text_len]` int64, exactly as the official tokenizer."""
        if not isinstance(prompt, str):
            raise InputError("prompt", f"expected text, got {type(prompt).__name__}.",
                             "pass the prompt as a string.")
        return self.tokenizer(prompt)

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """`context [L, d_model]` for one prompt, L = real tokens including `</s>` (1 for "")."""
        if prompt in self._memo:
            self._memo.move_to_end(prompt)
            return self._memo[prompt].clone()
        input_ids, mask = self.tokenize(prompt)
        hidden = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
        context = hidden.last_hidden_state[0, : int(mask.sum())].clone()
        if self.memo_size > 0:
            self._memo[prompt] = context
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        return context.clone()


def _check_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError("device", f"'{device}' is not a device ({exc}).", "use 'cpu' or 'cuda'.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device", "CUDA was requested but no CUDA GPU is available.", "use device 'cpu'.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise InputError("device", f"the text encoder runs on CPU or CUDA, not '{device.type}'.",
                         "use 'cpu' or 'cuda'.")
    return device


def _resolve_tokenizer(weights_path: Path, tokenizer_path: str | Path | None,
                       text_len: int) -> PromptTokenizer:
    return PromptTokenizer.from_folder(tokenizer_folder(weights_path, tokenizer_path), text_len)


def _build_model(state_dict: T5StateDict, config: UMT5Config, device: torch.device) -> UMT5EncoderModel:
    """Build `UMT5EncoderModel` without allocating random weights, then move each tensor in once."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    tensors = {k: state_dict[k].to(device) for k in state_dict if k != TIED_KEY}
    tensors[TIED_KEY] = tensors["shared.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    # assign=True gives each name its own Parameter; re-tie so moves and edits keep one table.
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.eval().requires_grad_(False)
