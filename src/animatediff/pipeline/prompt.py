"""CLIP prompt encoding.

Prompts longer than the tokenizer's 77 tokens are truncated, with a warning naming what was
dropped: the official AnimateDiff and diffusers pipelines truncate (silently), so truncation keeps
their results, and a warning tells users why the end of a long prompt has no effect.
"""

from __future__ import annotations

import warnings

import torch
from transformers import CLIPTextModel, CLIPTokenizer


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    max_length = tokenizer.model_max_length
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        for prompt, row in zip(prompts, full):
            dropped = tokenizer.batch_decode(row[max_length - 1 : -1].unsqueeze(0))[0]
            dropped = dropped.replace("<|endoftext|>", "").strip()
            if dropped:
                warnings.warn(
                    f"prompt longer than {max_length} CLIP tokens; this part was dropped: "
                    f"{dropped!r} (prompt: {prompt[:40]!r}...)",
                    stacklevel=3,
                )
    return ids


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]
) -> torch.Tensor:
    """(len(prompts), 77, d) last hidden states of the CLIP text encoder."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]
