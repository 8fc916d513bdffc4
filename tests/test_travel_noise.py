"""Prompt travel (parsing, per-frame embeddings) and initial-noise tools (FreeNoise, FreeInit)."""

from __future__ import annotations

import math

import pytest
import torch

from animatediff.pipeline.noise import (
    FREEINIT_DEFAULTS,
    freeinit_reinit,
    freenoise_latents,
    freq_filter,
)
from animatediff.pipeline.travel import (
    compose_prompt,
    frame_embeddings,
    parse_prompt_map,
    slerp,
    travel_prompts,
)

# == prompt travel ===========================================================================


def test_parse_prompt_map_sorts_and_resolves_last():
    assert parse_prompt_map({8: "b", 0: "a", -1: "c"}, 16) == [(0, "a"), (8, "b"), (15, "c")]
    # YAML / JSON string keys
    assert parse_prompt_map({"-1": "c", "0": "a", " 4 ": "b"}, 10) == [
        (0, "a"),
        (4, "b"),
        (9, "c"),
    ]


@pytest.mark.parametrize(
    "prompt_map, error, message",
    [
        ({16: "x"}, ValueError, "outside frames 0..15"),
        ({-2: "x"}, ValueError, "outside"),
        ({"x3": "x"}, ValueError, "not a frame index"),
        ({1.5: "x"}, ValueError, "not a frame index"),
        ({True: "x"}, ValueError, "not a frame index"),
        ({15: "a", -1: "b"}, ValueError, "both name frame 15"),
        ({"3": "a", 3: "b"}, ValueError, "both name frame 3"),
        ({0: 3}, ValueError, "must be a string"),
        ({}, ValueError, "empty"),
    ],
)
def test_parse_prompt_map_errors(prompt_map, error, message):
    with pytest.raises(error, match=message):
        parse_prompt_map(prompt_map, 16)


def test_compose_prompt():
    assert compose_prompt("masterpiece", "a cat", "4k") == "masterpiece, a cat, 4k"
    assert compose_prompt("", "a cat", "") == "a cat"
    assert compose_prompt("best quality, ", " a cat ", "  ") == "best quality, a cat"
    assert travel_prompts({-1: "b", 0: "a"}, 4, head="hq") == [(0, "hq, a"), (3, "hq, b")]


def _keys(gen: torch.Generator):
    return [(f, torch.randn(77, 8, generator=gen)) for f in (2, 6, 9)]


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_frame_embeddings_exact_at_keys_and_held_outside(method):
    keys = _keys(torch.Generator().manual_seed(0))
    out = frame_embeddings(list(reversed(keys)), 12, method)
    assert out.shape == (12, 77, 8)
    for frame, emb in keys:
        assert torch.equal(out[frame], emb)
    assert torch.equal(out[0], keys[0][1]) and torch.equal(out[1], keys[0][1])
    assert torch.equal(out[10], keys[2][1]) and torch.equal(out[11], keys[2][1])


def test_frame_embeddings_linear_midpoint_and_quarter():
    a, b = torch.randn(77, 8), torch.randn(77, 8)
    out = frame_embeddings([(0, a), (4, b)], 5)
    assert torch.allclose(out[2], torch.lerp(a, b, 0.5))
    assert torch.allclose(out[2], (a + b) / 2, atol=1e-6)
    assert torch.allclose(out[1], 0.75 * a + 0.25 * b, atol=1e-6)


def test_slerp_hand_computed_and_norm():
    a = torch.tensor([[1.0, 0.0]])  # one "token" vector
    b = torch.tensor([[0.0, 1.0]])
    out = frame_embeddings([(0, a), (3, b)], 4, "slerp")
    # angle pi/2 in three steps: frame 1 is at pi/6, frame 2 at pi/3
    assert torch.allclose(out[1], torch.tensor([[math.sqrt(3) / 2, 0.5]]), atol=1e-6)
    assert torch.allclose(out[2], torch.tensor([[0.5, math.sqrt(3) / 2]]), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(4, 1), atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([[1.0, 1.0]]) / math.sqrt(2), atol=1e-6)


def test_slerp_per_token_and_parallel_fallback():
    unit = torch.nn.functional.normalize(torch.randn(77, 16), dim=-1)
    other = torch.nn.functional.normalize(torch.randn(77, 16), dim=-1)
    out = frame_embeddings([(0, unit), (8, other)], 9, "slerp")
    assert torch.allclose(out.norm(dim=-1), torch.ones(9, 77), atol=1e-5)
    # parallel vectors: no NaN, plain lerp
    mid = slerp(unit, 3 * unit, 0.5)
    assert torch.allclose(mid, 2 * unit, atol=1e-6)


def test_frame_embeddings_errors():
    e = torch.zeros(77, 8)
    with pytest.raises(ValueError, match="interpolation"):
        frame_embeddings([(0, e)], 4, "cubic")
    with pytest.raises(ValueError, match="lie in"):
        frame_embeddings([(4, e)], 4)
    with pytest.raises(ValueError, match="duplicate"):
        frame_embeddings([(1, e), (1, e)], 4)
    with pytest.raises(ValueError, match="shape"):
        frame_embeddings([(0, e), (2, torch.zeros(77, 4))], 4)


# == FreeInit ================================================================================


def test_freeinit_defaults():
    assert dict(FREEINIT_DEFAULTS) == {
        "iterations": 3,
        "kind": "butterworth",
        "n": 4,
        "d_s": 0.25,
        "d_t": 0.25,
    }


@pytest.mark.parametrize("kind", ["gaussian", "butterworth", "ideal", "box"])
def test_filter_centre_is_one(kind):
    assert freq_filter((4, 8, 8), kind)[2, 4, 4] == 1.0
    assert freq_filter((1, 2, 3, 5, 7), kind)[1, 2, 3] == 1.0  # odd sizes: the DC bin
    assert freq_filter((4, 8, 8), kind).shape == (4, 8, 8)


def test_filter_values_by_hand():
    shape = (2, 1, 4, 8, 8)  # T=4, H=W=8
    g = freq_filter(shape, "gaussian").double()
    b = freq_filter(shape, "butterworth").double()
    # (0, 0, 0): 2t/T-1 = 2h/H-1 = 2w/W-1 = -1, d^2 = 3; d_s^2 = 1/16
    assert math.isclose(g[0, 0, 0], math.exp(-3 / (2 / 16)), rel_tol=1e-5)
    assert math.isclose(b[0, 0, 0], 1 / (1 + 48**4), rel_tol=1e-5)
    # (3, 6, 2): coordinates 0.5, 0.5, -0.5, d^2 = 0.75
    assert math.isclose(g[3, 6, 2], math.exp(-6), rel_tol=1e-5)
    assert math.isclose(b[3, 6, 2], 1 / (1 + 12**4), rel_tol=1e-5)
    # d_t = 0.5: the temporal coordinate is scaled by d_s/d_t = 0.5; (3, 4, 4): d^2 = 1/16
    g2 = freq_filter(shape, "gaussian", d_t=0.5).double()
    b2 = freq_filter(shape, "butterworth", n=2, d_t=0.5).double()
    assert math.isclose(g2[3, 4, 4], math.exp(-0.5), rel_tol=1e-6)
    assert math.isclose(b2[3, 4, 4], 0.5, rel_tol=1e-6)
    # ideal: (2, 5, 4) has d^2 = 1/16 = d_s^2, on the sphere (kept); (2, 6, 4) has d^2 = 1/4
    # box: (2, 5, 5) has |fh| = |fw| = 0.25 <= d_s (kept); (2, 6, 4) has |fh| = 0.5
    assert freq_filter(shape, "ideal")[2, 5, 4] == 1.0
    assert freq_filter(shape, "ideal")[2, 6, 4] == 0.0
    assert freq_filter(shape, "box")[2, 5, 5] == 1.0
    assert freq_filter(shape, "box")[2, 6, 4] == 0.0
    assert (freq_filter(shape, d_s=0) == 0).all()


def test_reinit_all_pass_and_all_stop():
    gen = torch.Generator().manual_seed(1)
    z, noise = torch.randn(2, 4, 6, 8, 8, generator=gen), torch.randn(2, 4, 6, 8, 8, generator=gen)
    ones, zeros = torch.ones(6, 8, 8), torch.zeros(6, 8, 8)
    assert torch.allclose(freeinit_reinit(z, noise, ones), z, atol=1e-5)
    assert torch.allclose(freeinit_reinit(z, noise, zeros), noise, atol=1e-5)


@pytest.mark.parametrize("kind", ["ideal", "butterworth"])
def test_reinit_bands(kind):
    gen = torch.Generator().manual_seed(2)
    z, noise = (
        torch.randn(1, 4, 8, 16, 16, generator=gen),
        torch.randn(1, 4, 8, 16, 16, generator=gen),
    )
    lpf = freq_filter(z.shape, kind)
    out = freeinit_reinit(z, noise, lpf)
    assert out.dtype == z.dtype and out.shape == z.shape

    def spectrum(x):
        return torch.fft.fftshift(torch.fft.fftn(x, dim=(-3, -2, -1)), dim=(-3, -2, -1))

    s_out, s_z, s_n = spectrum(out), spectrum(z), spectrum(noise)
    assert torch.allclose(s_out, s_z * lpf + s_n * (1 - lpf), atol=1e-3)
    if kind == "ideal":  # a 0/1 mask splits the spectrum exactly
        low = lpf.bool().expand_as(s_out)
        assert 0 < low.sum() < low.numel()
        assert torch.allclose(s_out[low], s_z[low], atol=1e-3)
        assert torch.allclose(s_out[~low], s_n[~low], atol=1e-3)


# == FreeNoise ===============================================================================


def test_freenoise_short_clip_unchanged():
    x = torch.randn(1, 4, 16, 2, 2)
    assert freenoise_latents(x, 16, 4, torch.Generator().manual_seed(0)) is x
    x = torch.randn(1, 4, 10, 2, 2)
    assert torch.equal(freenoise_latents(x, 16, 4, None), x)


@pytest.mark.parametrize("num_frames, overlap", [(40, 4), (35, 4), (48, 0), (33, 15)])
def test_freenoise_windows_are_permutations(num_frames, overlap):
    length, hop = 16, 16 - overlap
    x = torch.randn(2, 4, num_frames, 3, 3)
    out = freenoise_latents(x, length, overlap, torch.Generator().manual_seed(3))
    assert torch.equal(out[:, :, :length], x[:, :, :length])
    assert not torch.equal(out, x)

    def frames(lo, hi):  # each frame's (b, c, h, w) noise as a hashable key
        return [tuple(out[:, :, i].flatten().tolist()) for i in range(lo, min(hi, num_frames))]

    first = sorted(frames(0, length))
    for k in range(1, (num_frames - length) // hop + 2):
        lo = k * hop
        if lo >= num_frames:
            break
        current, previous = frames(lo, lo + length), set(frames(lo - hop, lo - hop + length))
        assert all(frame in previous for frame in current)  # each frame comes from window k-1
        if lo + length <= num_frames:  # full windows hold exactly the first window's frames
            assert sorted(current) == first


def test_freenoise_deterministic_and_seed_dependent():
    x = torch.randn(1, 4, 40, 2, 2)
    x0 = x.clone()
    a = freenoise_latents(x, 16, 4, torch.Generator().manual_seed(7))
    b = freenoise_latents(x, 16, 4, torch.Generator().manual_seed(7))
    c = freenoise_latents(x, 16, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, x0)  # the input is not modified
    with pytest.raises(ValueError, match="context_overlap"):
        freenoise_latents(x, 16, 16, None)
