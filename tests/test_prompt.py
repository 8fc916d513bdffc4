"""Prompts as A1111/ComfyUI users write them: attention syntax, 75-token chunks, weights,
textual inversions, clip skip; and the plain path unchanged bit for bit."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin
from transformers import CLIPTextModel, CLIPTokenizer

from animatediff.builtin import WORDS, write_word_tokenizer
from animatediff.checkpoints.embeddings import TextualInversions, read_embedding
from animatediff.checkpoints.io import CheckpointError
from animatediff.checkpoints.kinds import check_kind
from animatediff.pipeline.prompt import (
    CHUNK_TOKENS,
    chunk_prompt,
    encode_prompts,
    unknown_words,
)
from animatediff.pipeline.prompt_syntax import BREAK, parse_prompt_attention

BASE = Path(__file__).parent / "data" / "official_tiny" / "base"
# Words that are one token each in the tiny real-CLIP vocabulary (checked in `words`).
ONE_TOKEN = ["red", "house", "the", "a", "man", "on", "in", "of"]


def load_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(BASE / "tokenizer")


def load_text_encoder() -> CLIPTextModel:
    return CLIPTextModel.from_pretrained(BASE / "text_encoder").eval()


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def te() -> CLIPTextModel:
    return load_text_encoder()


def words(tok: CLIPTokenizer, n: int) -> str:
    """n one-token words, no commas."""
    for w in ONE_TOKEN:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    return " ".join(itertools.islice(itertools.cycle(ONE_TOKEN), n))


def ids_of(tok: CLIPTokenizer, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def body(tok: CLIPTokenizer, tokens: list[int]) -> list[int]:
    """A chunk's 77 ids around `tokens`: BOS, tokens, EOS, padding."""
    pad = [tok.pad_token_id] * (CHUNK_TOKENS - len(tokens))
    return [tok.bos_token_id, *tokens, tok.eos_token_id, *pad]


def save_emb(file: Path, vectors: int, width: int = 32) -> Path:
    """A tiny A1111-style `.safetensors` embedding of random vectors."""
    safetensors.torch.save_file({"emb_params": torch.randn(vectors, width)}, file)
    return file


def plain(tok: CLIPTokenizer, te: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """The encoding of the official and diffusers pipelines (<= 77 tokens)."""
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return te(ids)[0]


def encode_ids(te: CLIPTextModel, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return te(torch.tensor(ids))[0]


# -- grammar ---------------------------------------------------------------------------------
# The examples of parse_prompt_attention's docstring in AUTOMATIC1111/stable-diffusion-webui,
# modules/prompt_parser.py, with their documented outputs.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES)
def test_parse_matches_a1111_documented_examples(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:1.2)", [("word", 1.2)]),
        ("(word: 0.8 ) x", [("word", 0.8), (" x", 1.0)]),
        ("((a:2) b)", [("a", 2 * 1.1), (" b", 1.1)]),
        ("a ) b ] c:d", [("a ) b ] c:d", 1.0)]),  # nothing open: kept as text
        ("a \\\\ b \\x", [("a \\ b x", 1.0)]),  # escaped backslash; a lone one is dropped
        ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight with no open bracket is text
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # A1111 would weight the BREAK
        ("aBREAK b", [("aBREAK b", 1.0)]),  # BREAK only as a word of its own
    ],
)
def test_parse_weights_escapes_and_break(text, expected):
    assert parse_prompt_attention(text) == expected


def test_parse_rejects_a_malformed_weight():
    with pytest.raises(ValueError, match="bad attention weight"):
        parse_prompt_attention("(word:1.2.3)")


# -- chunking ----------------------------------------------------------------------------------
def test_long_prompt_is_cut_into_75_token_chunks(tok):
    for n, k in [(75, 1), (76, 2), (150, 2), (151, 3)]:
        text = words(tok, n)
        tokens = ids_of(tok, text)
        assert len(tokens) == n
        chunks = chunk_prompt(tok, text)
        assert [c.ids for c in chunks] == [body(tok, tokens[i : i + 75]) for i in range(0, n, 75)]
        assert len(chunks) == k
        assert all(len(c.ids) == len(c.weights) == 77 for c in chunks)


@pytest.mark.parametrize("comma_at,cut", [(70, 71), (55, 56), (54, 75), (30, 75)])
def test_chunk_ends_at_a_comma_within_20_tokens(tok, comma_at, cut):
    text = words(tok, comma_at) + ", " + words(tok, 100 - comma_at)
    tokens = ids_of(tok, text)
    assert tokens[comma_at] == tok.get_vocab()[",</w>"] and len(tokens) == 101
    chunks = chunk_prompt(tok, text)
    assert [c.ids for c in chunks] == [body(tok, tokens[:cut]), body(tok, tokens[cut:])]


def test_break_starts_a_new_chunk(tok):
    chunks = chunk_prompt(tok, "red house BREAK the tree")
    assert [c.ids for c in chunks] == [
        body(tok, ids_of(tok, "red house")),
        body(tok, ids_of(tok, "the tree")),
    ]
    # Two BREAKs in a row leave an empty chunk between them, as in A1111.
    assert [c.ids for c in chunk_prompt(tok, "red BREAK BREAK house")][1] == body(tok, [])
    # Literal prompts (attention_syntax=False) have no BREAK and no weights.
    literal = chunk_prompt(tok, "(red) BREAK house", attention_syntax=False)
    assert [c.ids for c in literal] == [body(tok, ids_of(tok, "(red) BREAK house"))]
    assert set(literal[0].weights) == {1.0}


def test_prompts_are_padded_to_the_same_chunk_count_with_the_empty_prompt(tok, te):
    long, short = words(tok, 150), "red house, new day"
    out = encode_prompts(tok, te, [long, short])
    assert out.shape == (2, 154, 32)
    first, second = chunk_prompt(tok, long)
    torch.testing.assert_close(out[0, :77], encode_ids(te, [first.ids])[0])
    torch.testing.assert_close(out[0, 77:], encode_ids(te, [second.ids])[0])
    torch.testing.assert_close(out[1, :77], plain(tok, te, [short])[0])
    torch.testing.assert_close(out[1, 77:], plain(tok, te, [""])[0])
    assert encode_prompts(tok, te, [short]).shape == (1, 77, 32)


def test_short_unweighted_prompts_encode_bitwise_as_the_plain_path(tok, te, tmp_path):
    prompts = [
        "a boy playing guitar, best quality",
        "worst quality, low quality",
        "",
        "a boy playing guitar, best quality",
        words(tok, 71) + ", red, house",  # 75 tokens exactly
    ]
    assert len(ids_of(tok, prompts[-1])) == 75
    expected = plain(tok, te, prompts)
    assert torch.equal(encode_prompts(tok, te, prompts), expected)
    # Loaded embeddings that the prompts do not name change nothing.
    embeddings = TextualInversions(32)
    embeddings.load(save_emb(tmp_path / "zzstyle.safetensors", 2))
    check_kind(tmp_path / "zzstyle.safetensors", "embedding")
    assert torch.equal(encode_prompts(tok, te, prompts, embeddings=embeddings), expected)


def test_long_prompts_do_not_warn(tok, te, recwarn):
    encode_prompts(tok, te, [words(tok, 200)])
    assert not [w for w in recwarn if "token" in str(w.message).lower()]


# -- weights -----------------------------------------------------------------------------------
def test_weights_scale_tokens_then_restore_the_mean(tok, te):
    weighted, unweighted = "a (red:1.5) [house]", "a red house"
    chunk = chunk_prompt(tok, weighted)[0]
    assert chunk.ids == body(tok, ids_of(tok, unweighted))
    assert chunk.weights[:5] == [1.0, 1.0, 1.5, 1 / 1.1, 1.0]
    z = encode_ids(te, [chunk.ids])[0]
    w = torch.tensor(chunk.weights)[:, None]
    expected = z * w * (z.mean() / (z * w).mean())
    out = encode_prompts(tok, te, [weighted, unweighted])
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[0].mean(), z.mean())
    ratio = out[0] / z  # per token: weight x one common factor
    torch.testing.assert_close(ratio[2] / ratio[1], torch.full((32,), 1.5))
    torch.testing.assert_close(ratio[3] / ratio[1], torch.full((32,), 1 / 1.1))
    # The weighted prompt does not change the other prompt of the batch.
    assert torch.equal(out[1], plain(tok, te, [weighted, unweighted])[1])


# -- clip skip -------------------------------------------------------------------------------
def test_clip_skip_2_is_the_penultimate_layer_through_the_final_layer_norm(tok, te):
    prompts = ["a boy playing guitar, best quality", ""]
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states
        expected = te.final_layer_norm(hidden[-2])
    out = encode_prompts(tok, te, prompts, clip_skip=2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out - encode_prompts(tok, te, prompts, clip_skip=1)).abs().max() > 1e-2
    for bad in (0, 3, True, 1.0):
        with pytest.raises(ValueError, match="clip_skip"):
            encode_prompts(tok, te, prompts, clip_skip=bad)


# -- textual inversion -----------------------------------------------------------------------
class _DiffusersReference(TextualInversionLoaderMixin):
    """diffusers' own textual-inversion loader (new tokens + embedding rows), as a reference."""

    hf_device_map = None
    components: dict = {}


def diffusers_encode(files: dict[str, Path], prompt: str) -> torch.Tensor:
    tok2, te2 = load_tokenizer(), load_text_encoder()
    ref = _DiffusersReference()
    for name, file in files.items():
        ref.load_textual_inversion(str(file), token=name, tokenizer=tok2, text_encoder=te2)
    return plain(tok2, te2, [ref.maybe_convert_prompt(prompt, tok2)])


def save_formats(tmp_path: Path, vectors: torch.Tensor) -> dict[str, Path]:
    """One embedding in each format users have, named by the file stem."""
    files = {
        "a1111": tmp_path / "a1111.pt",
        "ldm": tmp_path / "ldm.pt",
        "emb": tmp_path / "emb.safetensors",
        "diffusers": tmp_path / "diffusers.bin",
    }
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors},
        "name": "trained-as",
        "step": 1000,
        "sd_checkpoint": "abcdef12",
        "sd_checkpoint_name": "v1-5-pruned",
    }
    torch.save(a1111, files["a1111"])
    ldm = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": ldm}, files["ldm"])
    safetensors.torch.save_file({"emb_params": vectors}, files["emb"])
    torch.save({"<diffusers>": vectors}, files["diffusers"])
    return files


def test_embedding_files_in_every_format(tmp_path):
    vectors = torch.randn(3, 32)
    for stem, file in save_formats(tmp_path, vectors).items():
        embedding = read_embedding(file)
        assert embedding.name == stem
        assert torch.equal(embedding.vectors, vectors)
    assert read_embedding(tmp_path / "a1111.pt").trained_name == "trained-as"
    assert read_embedding(tmp_path / "emb.safetensors", name="other").name == "other"
    torch.save({"<one>": vectors[0]}, tmp_path / "one.bin")  # diffusers: a single vector
    assert read_embedding(tmp_path / "one.bin").vectors.shape == (1, 32)


def test_embedding_name_is_replaced_by_its_vectors_as_diffusers_does(tok, te, tmp_path):
    files = {
        "mystyle": tmp_path / "mystyle.safetensors",
        "badhands": tmp_path / "badhands.pt",
    }
    safetensors.torch.save_file({"emb_params": torch.randn(3, 32)}, files["mystyle"])
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "x"}, files["badhands"])
    embeddings = TextualInversions(32)
    for file in files.values():
        embeddings.load(file)
    prompt = "a mystyle house, red, badhands"
    chunk = chunk_prompt(tok, prompt, embeddings=embeddings)[0]
    assert [(at, e.name) for at, e in chunk.fixes] == [(2, "mystyle"), (9, "badhands")]
    out = encode_prompts(tok, te, [prompt], embeddings=embeddings)
    assert torch.equal(out, diffusers_encode(files, prompt))
    # A1111 matches names after CLIP's lowercasing.
    upper = encode_prompts(tok, te, ["a MyStyle house, red, BadHands"], embeddings=embeddings)
    assert torch.equal(upper, out)


def test_embedding_vectors_count_as_tokens_and_stay_in_one_chunk(tok, tmp_path):
    embeddings = TextualInversions(32)
    embeddings.load(save_emb(tmp_path / "mystyle.safetensors", 3))
    fits = chunk_prompt(tok, words(tok, 72) + " mystyle", embeddings=embeddings)
    assert len(fits) == 1 and fits[0].fixes[0][0] == 73
    moved = chunk_prompt(tok, words(tok, 73) + " mystyle", embeddings=embeddings)
    assert [len(c.fixes) for c in moved] == [0, 1] and moved[1].fixes[0][0] == 1
    assert moved[0].ids == body(tok, ids_of(tok, words(tok, 73)))
    # Cut at a comma: the embedding after it moves with the tokens that follow the comma.
    text = words(tok, 70) + ", red mystyle house"
    first, second = chunk_prompt(tok, text, embeddings=embeddings)
    assert first.fixes == [] and [at for at, _ in second.fixes] == [2]
    assert first.ids == body(tok, ids_of(tok, words(tok, 70) + ","))


def test_embedding_errors(tmp_path):
    embeddings = TextualInversions(32)
    with pytest.raises(CheckpointError, match=r"wide\.safetensors.*width 768.*32"):
        embeddings.load(save_emb(tmp_path / "wide.safetensors", 2, width=768))
    sdxl = {"clip_g": torch.randn(2, 1280), "clip_l": torch.randn(2, 768)}
    safetensors.torch.save_file(sdxl, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="SDXL"):
        embeddings.load(tmp_path / "xl.safetensors")
    two = {"a": torch.randn(2, 32), "b": torch.randn(2, 32)}
    safetensors.torch.save_file(two, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="2 tensors"):
        embeddings.load(tmp_path / "two.safetensors")
    embeddings.load(save_emb(tmp_path / "Style.safetensors", 2))
    with pytest.raises(ValueError, match="already loaded"):
        embeddings.load(tmp_path / "Style.safetensors", name="style")
    assert "STYLE" in embeddings and len(embeddings) == 1


class _Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran.txt"
    file = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _Payload(marker)}, "name": "evil"}, file)
    with pytest.raises(CheckpointError, match="refused for safety"):
        read_embedding(file)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(file, weights_only=False)
    assert marker.read_text() == "ran"


# -- vocabulary ------------------------------------------------------------------------------
def test_unknown_words_on_the_builtin_word_tokenizer(tmp_path):
    write_word_tokenizer(tmp_path / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    text = "a (red:1.2) circle, [dragon] BREAK zooming on Green, castle's dragon"
    expected = [w for w in ["dragon", "zooming", "castle"] if w not in WORDS]
    assert expected == ["dragon", "zooming", "castle"]
    assert unknown_words(tok, text) == expected
    assert unknown_words(tok, "a red circle moving left, best quality") == []
