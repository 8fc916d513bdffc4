"""CLIP prompt encoding the way A1111 and ComfyUI users write prompts.

- Attention syntax: `(word)`, `[word]`, `(word:1.2)`, escapes, `BREAK` (see `prompt_syntax.py`).
- Any length: a prompt is cut into chunks of 75 tokens, each encoded on its own as BOS + 75 tokens
  + EOS/padding = 77, and the chunks are concatenated along the token axis (77 k tokens). As in
  A1111, a chunk that would end within 20 tokens after a comma ends at that comma instead (the
  rest moves to the next chunk), and BREAK ends a chunk. Prompts encoded together are padded to
  the same k with chunks of the empty prompt.
- Weights, A1111's default ("Original") emphasis: each token's output vector is multiplied by its
  weight, then the chunk is rescaled so that its mean is the unweighted mean. The mean is taken
  per prompt and chunk (A1111 takes it over a batch that holds one prompt), so a prompt encodes
  the same whatever it is encoded with.
- Textual inversions (`checkpoints/embeddings.py`): where a prompt's tokens spell an embedding's
  name, its n vectors take the place of the name (n tokens). They are put in by a hook on the
  token-embedding layer, present only while a chunk that uses one is encoded: the tokenizer and
  the model are never changed, so other prompts encode exactly as without embeddings.
- Clip skip, numbered as in A1111 and ComfyUI: 1 = the last layer (the default), 2 = the
  penultimate layer's hidden state passed through the final layer norm, and so on. diffusers'
  `clip_skip` counts from 0 (its 1 is A1111's 2).

A prompt of at most 75 tokens without weights or embeddings, at clip skip 1, encodes exactly
(bitwise) as `text_encoder(tokenizer(prompts, padding="max_length", max_length=77))[0]`: the
encoding of the official AnimateDiff and diffusers pipelines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ..checkpoints.embeddings import Embedding, TextualInversions
from ..options import OptionError
from .prompt_syntax import BREAK, parse_prompt_attention

__all__ = [
    "CHUNK_TOKENS",
    "COMMA_BACKTRACK",
    "Chunk",
    "chunk_prompt",
    "encode_prompts",
    "token_ids",
    "unknown_words",
]

CHUNK_TOKENS = 75  # prompt tokens per chunk; with BOS and EOS the 77 CLIP positions
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack"
_PLACEHOLDER = 0  # token id under an embedding's vectors (its embedding row is replaced)
_LETTERS = re.compile(r"[^\W\d_]+")


@dataclass
class Chunk:
    """One 77-token piece of a prompt: ids (BOS, tokens, EOS, padding), a weight per id, and the
    textual inversions to put in, as (position in ids, embedding)."""

    ids: list[int]
    weights: list[float]
    fixes: list[tuple[int, Embedding]]


# -- tokens to chunks --------------------------------------------------------------------------
class _Names:
    """Finds where a prompt's tokens spell a textual inversion's name (longest name first)."""

    def __init__(self, tokenizer: CLIPTokenizer, embeddings: Iterable[Embedding] | None) -> None:
        self.by_first: dict[int, list[tuple[list[int], Embedding]]] = {}
        for embedding in embeddings or ():
            ids = tokenizer(embedding.name, add_special_tokens=False).input_ids
            if not ids:
                raise ValueError(f"embedding name {embedding.name!r} has no tokens to match")
            self.by_first.setdefault(ids[0], []).append((ids, embedding))
        for options in self.by_first.values():
            options.sort(key=lambda option: len(option[0]), reverse=True)

    def match(self, tokens: list[int], pos: int) -> tuple[Embedding, int] | None:
        for ids, embedding in self.by_first.get(tokens[pos], ()):
            if tokens[pos : pos + len(ids)] == ids:
                return embedding, len(ids)
        return None


class _Chunker:
    """A1111's prompt-to-chunks loop: tokens go into the open chunk, which is closed when full
    (at the last comma if one is close), at a BREAK, and at the end."""

    def __init__(self, tokenizer: CLIPTokenizer, names: _Names) -> None:
        self.names = names
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.comma = tokenizer.get_vocab().get(",</w>")
        self.chunks: list[Chunk] = []
        self._open()

    def _open(self, ids=(), weights=(), fixes=()) -> None:
        self.ids, self.weights, self.fixes = list(ids), list(weights), list(fixes)
        self.last_comma = -1

    def close(self) -> None:
        padding = CHUNK_TOKENS - len(self.ids)
        ids = [self.bos, *self.ids, self.eos, *[self.pad] * padding]
        weights = [1.0, *self.weights, 1.0, *[1.0] * padding]
        self.chunks.append(Chunk(ids, weights, [(1 + at, e) for at, e in self.fixes]))
        self._open()

    def finish(self) -> list[Chunk]:
        if self.ids or not self.chunks:
            self.close()
        return self.chunks

    def add(self, tokens: list[int], weight: float) -> None:
        pos = 0
        while pos < len(tokens):
            if tokens[pos] == self.comma:
                self.last_comma = len(self.ids)
            elif (
                len(self.ids) == CHUNK_TOKENS
                and self.last_comma != -1
                and CHUNK_TOKENS - self.last_comma <= COMMA_BACKTRACK
            ):
                self._break_after_comma()
            if len(self.ids) == CHUNK_TOKENS:
                self.close()
            pos += self._append(tokens, pos, weight)

    def _append(self, tokens: list[int], pos: int, weight: float) -> int:
        """Append the token at `pos`, or the embedding whose name starts there; returns how
        many prompt tokens were used. An embedding that does not fit starts a new chunk."""
        match = self.names.match(tokens, pos)
        if match is None:
            self.ids.append(tokens[pos])
            self.weights.append(weight)
            return 1
        embedding, used = match
        n = len(embedding.vectors)
        if len(self.ids) + n > CHUNK_TOKENS:
            self.close()
        self.fixes.append((len(self.ids), embedding))
        self.ids += [_PLACEHOLDER] * n
        self.weights += [weight] * n
        return used

    def _break_after_comma(self) -> None:
        cut = self.last_comma + 1
        rest_fixes = [(at - cut, e) for at, e in self.fixes if at >= cut]
        rest = (self.ids[cut:], self.weights[cut:], rest_fixes)
        self.ids, self.weights = self.ids[:cut], self.weights[:cut]
        self.fixes = [(at, e) for at, e in self.fixes if at < cut]
        self.close()
        self._open(*rest)


def _chunks(tokenizer: CLIPTokenizer, text: str, names: _Names, syntax: bool) -> list[Chunk]:
    parts = parse_prompt_attention(text) if syntax else [(text, 1.0)]
    # verbose=False: no "sequence longer than 77" warning, nothing is dropped here.
    tokens = tokenizer([t for t, _ in parts], add_special_tokens=False, verbose=False).input_ids
    chunker = _Chunker(tokenizer, names)
    for part, ids in zip(parts, tokens):
        if syntax and part == BREAK:
            chunker.close()
        else:
            chunker.add(ids, part[1])
    return chunker.finish()


def chunk_prompt(
    tokenizer: CLIPTokenizer,
    text: str,
    *,
    embeddings: TextualInversions | None = None,
    attention_syntax: bool = True,
) -> list[Chunk]:
    """The 77-token chunks `encode_prompts` encodes for one prompt (see the module docstring)."""
    return _chunks(tokenizer, text, _Names(tokenizer, embeddings), attention_syntax)


def token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), 77): the prompts' token ids read literally, as the official pipelines
    tokenize (longer prompts truncated); for a text encoder that runs in a training step."""
    max_length = tokenizer.model_max_length
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


# -- chunks to embeddings ----------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    prompts: list[str],
    *,
    clip_skip: int = 1,
    embeddings: TextualInversions | None = None,
    attention_syntax: bool = True,
) -> torch.Tensor:
    """(len(prompts), 77 k, d): the prompts' CLIP encodings, every prompt padded to the same
    number k of chunks. `attention_syntax=False` reads prompts literally (no weights, no BREAK)."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    _check_clip_skip(text_encoder, clip_skip)
    names = _Names(tokenizer, embeddings)
    unique = {p: _chunks(tokenizer, p, names, attention_syntax) for p in dict.fromkeys(prompts)}
    chunked = [unique[p] for p in prompts]
    empty = _chunks(tokenizer, "", names, False)[0]
    columns = [
        _encode_column(text_encoder, [c[i] if i < len(c) else empty for c in chunked], clip_skip)
        for i in range(max(map(len, chunked)))
    ]
    return columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)


def _check_clip_skip(text_encoder: CLIPTextModel, clip_skip: int) -> None:
    layers = text_encoder.config.num_hidden_layers
    if type(clip_skip) is not int or not 1 <= clip_skip <= layers:  # bool is not int here
        raise OptionError(
            f"clip_skip must be an integer from 1 (the last layer, the default) to {layers} "
            f"(the text encoder's layers), got {clip_skip!r}"
        )


def _encode_column(text_encoder: CLIPTextModel, chunks: list[Chunk], clip_skip: int):
    """(len(chunks), 77, d) for one chunk of every prompt, in one batch."""
    ids = torch.tensor([c.ids for c in chunks], device=text_encoder.device)
    with _inserted(text_encoder, chunks):
        z = _hidden_states(text_encoder, ids, clip_skip)
    return _emphasis(z, chunks)


@contextmanager
def _inserted(text_encoder: CLIPTextModel, chunks: list[Chunk]):
    """Put the chunks' textual-inversion vectors in place of their placeholder tokens."""
    if not any(c.fixes for c in chunks):
        yield
        return

    def put(module, args, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for row, chunk in enumerate(chunks):
            for at, embedding in chunk.fixes:
                out[row, at : at + len(embedding.vectors)] = embedding.vectors.to(out)
        return out

    handle = text_encoder.get_input_embeddings().register_forward_hook(put)
    try:
        yield
    finally:
        handle.remove()


def _hidden_states(text_encoder: CLIPTextModel, ids: torch.Tensor, clip_skip: int):
    if clip_skip == 1:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    # transformers 4 nests the layers under `text_model`; 5 does not.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def _emphasis(z: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
    """A1111's weighting, per row: z * weight per token, rescaled to the unweighted mean."""
    rows = [i for i, c in enumerate(chunks) if any(w != 1.0 for w in c.weights)]
    if not rows:
        return z  # untouched, bit for bit
    z = z.clone()
    for i in rows:
        plain = z[i].float()
        weights = torch.tensor(chunks[i].weights, device=z.device, dtype=torch.float32)
        weighted = plain * weights[:, None]
        z[i] = (weighted * (plain.mean() / weighted.mean())).to(z.dtype)
    return z


# -- vocabulary check --------------------------------------------------------------------------
def unknown_words(tokenizer: CLIPTokenizer, text: str) -> list[str]:
    """The words of a prompt (attention syntax removed, lowercased) whose `word</w>` is not one
    vocabulary entry, in order of appearance. Only meaningful for a word-level vocabulary such
    as the built-in model's (`animatediff.builtin.write_word_tokenizer`): there such a word is
    spelled out letter by letter, which the model never learned."""
    vocab = tokenizer.get_vocab()
    words: list[str] = []
    for part in parse_prompt_attention(text):
        if part == BREAK:
            continue
        for word in _LETTERS.findall(part[0].lower()):
            if f"{word}</w>" not in vocab and word not in words:
                words.append(word)
    return words
