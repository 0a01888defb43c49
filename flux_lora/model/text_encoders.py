"""Text conditioning: CLIP-L pooled output (77 tokens) and the T5-XXL encoder's hidden states, via transformers.

Tokenizers pad to their max length and no attention mask is passed (as in BFL's and diffusers' FLUX), so
padding tokens take part exactly as they did when the model was distilled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77


@dataclass
class TextEmbeddings:
    """What the DiT takes from the text: ``txt [B, L, context_in_dim]`` (T5) and ``y [B, vec_in_dim]`` (CLIP)."""

    txt: Tensor
    y: Tensor

    def to(self, *args: Any, **kwargs: Any) -> TextEmbeddings:
        return TextEmbeddings(self.txt.to(*args, **kwargs), self.y.to(*args, **kwargs))

    def __len__(self) -> int:
        return self.txt.shape[0]

    def __getitem__(self, idx: int | slice | list[int] | Tensor) -> TextEmbeddings:
        idx = [idx] if isinstance(idx, int) else idx
        return TextEmbeddings(self.txt[idx], self.y[idx])

    @staticmethod
    def cat(items: list[TextEmbeddings]) -> TextEmbeddings:
        return TextEmbeddings(torch.cat([e.txt for e in items]), torch.cat([e.y for e in items]))

    def repeat(self, n: int) -> TextEmbeddings:
        return TextEmbeddings(self.txt.repeat_interleave(n, 0), self.y.repeat_interleave(n, 0))


class TextEncoders(nn.Module):
    """CLIP-L + T5 with their tokenizers; ``encode(prompts)`` gives :class:`TextEmbeddings`."""

    def __init__(self, clip: nn.Module, clip_tokenizer: Any, t5: nn.Module, t5_tokenizer: Any, max_length: int):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.t5 = t5.eval().requires_grad_(False)
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.max_length = max_length

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        max_length: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> TextEncoders:
        """Load ``text_encoder/``, ``tokenizer/`` (CLIP) and ``text_encoder_2/``, ``tokenizer_2/`` (T5) from a folder
        in the FLUX.1 layout. Weights are read from safetensors only; no remote code is run."""
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        folder = _check_folder(folder, ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        kw: dict[str, Any] = dict(dtype=dtype, use_safetensors=True)
        # as nn.Modules: transformers' @wraps(nn.Module.to) on ``to`` hides from mypy that it is a bound method
        clip: nn.Module = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw)
        t5: nn.Module = T5EncoderModel.from_pretrained(folder / "text_encoder_2", **kw)
        clip, t5 = clip.to(device), t5.to(device)
        clip_tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
        t5_tok = AutoTokenizer.from_pretrained(folder / "tokenizer_2")
        return cls(clip, clip_tok, t5, t5_tok, max_length)

    @classmethod
    def skeleton(cls, folder: str | Path, max_length: int) -> TextEncoders:
        """CLIP-L and T5 built from ``text_encoder*/config.json`` on the meta device: the module names and
        shapes of :meth:`from_folder`'s encoders, with no weights read and no tokenizers (it cannot encode).
        Checks a LoRA's text-encoder parts before anything large loads."""
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        folder = _check_folder(folder, ("text_encoder", "text_encoder_2"))
        try:
            clip_config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
            t5_config = T5Config.from_pretrained(folder / "text_encoder_2")
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}: unreadable text-encoder config.json ({e})") from None
        with torch.device("meta"):
            clip, t5 = CLIPTextModel(clip_config), T5EncoderModel(t5_config)
        return cls(clip, None, t5, None, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.t5.parameters()).device

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``(clip ids [B, 77], t5 ids [B, max_length])``, padded to max length and truncated."""
        clip = self.clip_tokenizer(
            prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        t5 = self.t5_tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return clip, t5

    def t5_lengths(self, prompts: list[str]) -> list[int]:
        """Each prompt's T5 token count before truncation (more than ``max_length``: the rest is cut)."""
        return [len(ids) for ids in self.t5_tokenizer(prompts, truncation=False).input_ids]

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> TextEmbeddings:
        """Prompts -> ``TextEmbeddings(txt [B, max_length, d_t5], y [B, d_clip])`` on the encoders' device."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip_ids, t5_ids = self.tokenize(prompts)
        device = self.device
        y = self.clip(input_ids=clip_ids.to(device)).pooler_output
        txt = self.t5(input_ids=t5_ids.to(device)).last_hidden_state
        return TextEmbeddings(txt=txt, y=y)

    forward = encode


def _check_folder(folder: str | Path, parts: tuple[str, ...]) -> Path:
    folder = Path(folder)
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the text-encoder folders {missing} of the FLUX.1 layout")
    return folder
