"""Context windows, fusion weights and the window accumulator, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from animatediff.motion.frames import WindowAccumulator, window_text
from animatediff.options import ContextOptions
from animatediff.pipeline.context import context_windows, fuse_weights


def opts(schedule: str = "static", length: int = 16, overlap: int = 4, stride: int = 1):
    return ContextOptions(
        context_length=length,
        context_overlap=overlap,
        context_stride=stride,
        context_schedule=schedule,
    )


# -- options ---------------------------------------------------------------------------------
def test_defaults():
    o = ContextOptions()
    assert (o.context_length, o.context_overlap, o.context_stride) == (16, 4, 1)
    assert (o.context_schedule, o.context_fuse, o.hop) == ("static", "pyramid", 12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(context_overlap=16), "context_overlap"),
        (dict(context_overlap=20), "context_overlap"),
        (dict(context_overlap=-1), "context_overlap"),
        (dict(context_length=-1), "context_length"),
        (dict(context_length=2.5), "context_length"),
        (dict(context_stride=0), "context_stride"),
        (dict(context_schedule="loop"), "context_schedule"),
        (dict(context_fuse="linear"), "context_fuse"),
    ],
)
def test_invalid_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContextOptions(**kwargs)


def test_context_length_zero_or_none_means_all_frames_at_once():
    for length in (0, None):
        assert ContextOptions(context_length=length).context_length is None
        assert not ContextOptions(context_length=length).applies(1000)
        assert context_windows(40, 0, 1, ContextOptions(context_length=length)) == [list(range(40))]


def test_invalid_step():
    with pytest.raises(ValueError, match="step"):
        context_windows(40, 5, 5, opts())
    with pytest.raises(ValueError, match="num_frames"):
        context_windows(0, 0, 1, opts())


# -- schedules, hand-computed ----------------------------------------------------------------
W0_15 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]


def test_static_24():
    assert context_windows(24, 0, 10, opts()) == [
        W0_15,
        [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    ]


def test_static_40_same_every_step():
    expected = [
        W0_15,
        [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27],
        [24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39],
    ]
    for step in range(10):
        assert context_windows(40, step, 10, opts()) == expected


def test_static_28_no_duplicate_last():
    assert context_windows(28, 0, 1, opts()) == [
        W0_15,
        [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27],
    ]


@pytest.mark.parametrize("schedule", ["static", "uniform", "looped", "batched"])
def test_short_clips_one_window(schedule):
    for step in range(4):
        assert context_windows(16, step, 4, opts(schedule, stride=3)) == [W0_15]
        assert context_windows(10, step, 4, opts(schedule)) == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
        assert context_windows(1, step, 4, opts(schedule)) == [[0]]


def test_batched_last_pulled_back():
    expected = [
        W0_15,
        [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31],
        [24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39],
    ]
    assert context_windows(40, 0, 1, opts("batched")) == expected
    assert context_windows(40, 3, 5, opts("batched", overlap=8, stride=2)) == expected
    assert context_windows(32, 0, 1, opts("batched")) == expected[:2]


def test_looped_wraps():
    # step 0: offset 0; hop 12, ceil(20 / 12) = 2 windows
    assert context_windows(20, 0, 2, opts("looped")) == [
        W0_15,
        [12, 13, 14, 15, 16, 17, 18, 19, 0, 1, 2, 3, 4, 5, 6, 7],
    ]
    # step 1: phase 1/2, offset floor(0.5 * 20) = 10
    assert context_windows(20, 1, 2, opts("looped")) == [
        [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0, 1, 2, 3, 4, 5],
        [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
    ]


def test_looped_closes_the_loop_with_overlap():
    # N = 24, hop 12: the last window overlaps the first by exactly O = 4 frames
    assert context_windows(24, 0, 1, opts("looped")) == [
        W0_15,
        [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 0, 1, 2, 3],
    ]


def test_uniform_seams_move():
    # step 0 equals static
    assert context_windows(40, 0, 4, opts("uniform")) == context_windows(40, 0, 4, opts())
    # step 1: offset floor(0.5 * 12) = 6 -> starts -6 (clamped to 0), 6, 18, then 24
    assert context_windows(40, 1, 4, opts("uniform")) == [
        W0_15,
        [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
        [18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33],
        [24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39],
    ]
    # step 2: offset floor(0.25 * 12) = 3 -> starts 0, 9, 21, 24
    starts = [w[0] for w in context_windows(40, 2, 4, opts("uniform"))]
    assert starts == [0, 9, 21, 24]

    # the window edges inside the clip (seams) differ between steps
    def seams(step):
        ws = context_windows(40, step, 4, opts("uniform"))
        return {w[0] for w in ws if w[0] > 0} | {w[-1] for w in ws if w[-1] < 39}

    assert seams(0) == {12, 24, 15, 27}
    assert seams(1) == {6, 18, 24, 15, 21, 33}
    assert seams(0) != seams(1) != seams(2)


def test_stride_2_static():
    # d = 2: span 31 <= 40, hop 24: starts 0 then the pulled-back 40 - 31 = 9; d = 4 too long
    windows = context_windows(40, 0, 1, opts(stride=3))
    assert windows == context_windows(40, 0, 1, opts()) + [
        [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30],
        [9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39],
    ]
    assert context_windows(40, 0, 1, opts(stride=2)) == windows


def test_stride_2_looped():
    windows = context_windows(40, 0, 1, opts("looped", stride=2))
    assert windows[-2:] == [
        [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30],
        [24, 26, 28, 30, 32, 34, 36, 38, 0, 2, 4, 6, 8, 10, 12, 14],
    ]
    assert len(windows) == 4 + 2  # ceil(40 / 12) + ceil(40 / 24)


def test_stride_skipped_when_too_long():
    # N = 20: a d = 2 window spans 31 frames, longer than the clip
    assert context_windows(20, 0, 1, opts(stride=2)) == context_windows(20, 0, 1, opts())


# -- properties over many configurations -----------------------------------------------------
@pytest.mark.parametrize("schedule", ["static", "uniform", "looped", "batched"])
def test_every_frame_covered(schedule):
    for length, overlaps in ((4, (0, 1, 3)), (8, (0, 2, 4, 7)), (16, (0, 4, 8, 15))):
        for overlap in overlaps:
            for stride in (1, 2, 3):
                o = opts(schedule, length, overlap, stride)
                for num_frames in range(1, 75, 3):
                    for step in range(6):
                        windows = context_windows(num_frames, step, 6, o)
                        covered = set()
                        for w in windows:
                            assert len(w) == min(length, num_frames)
                            assert len(set(w)) == len(w)
                            assert all(0 <= i < num_frames for i in w)
                            covered.update(w)
                        assert covered == set(range(num_frames))
                        assert len({tuple(w) for w in windows}) == len(windows)


def test_uniform_no_frame_always_at_a_seam():
    # without overlap a frame is at a seam when every window holding it has it as its first
    # or last frame; only the clip's own ends (0 and 63) stay there at every step
    def at_seam(schedule, step):
        windows = context_windows(64, step, 8, opts(schedule, overlap=0))
        inner = {i for w in windows for i in w[1:-1]}
        return {i for w in windows for i in (w[0], w[-1])} - inner

    assert at_seam("static", 0) == {0, 15, 16, 31, 32, 47, 48, 63}
    assert at_seam("uniform", 1) == {0, 23, 24, 39, 40, 63}  # offset 8: starts 0, 8, 24, 40, 48
    assert set.intersection(*(at_seam("uniform", step) for step in range(8))) == {0, 63}
    # window edges: only the clamped first window's end and the last window's start stay put
    edges = [
        {i for w in context_windows(64, step, 8, opts("uniform")) for i in (w[0], w[-1])}
        for step in range(8)
    ]
    assert set.intersection(*edges) == {0, 15, 48, 63}


# -- fusion weights --------------------------------------------------------------------------
def test_fuse_weights_values():
    assert fuse_weights(5, "flat").tolist() == [1, 1, 1, 1, 1]
    assert fuse_weights(5, "pyramid").tolist() == [1, 2, 3, 2, 1]
    assert fuse_weights(4, "pyramid").tolist() == [1, 2, 2, 1]
    assert fuse_weights(8, "overlap-linear", 3).tolist() == [
        0.25,
        0.5,
        0.75,
        1,
        1,
        0.75,
        0.5,
        0.25,
    ]
    assert fuse_weights(4, "overlap-linear", 3).tolist() == [0.25, 0.5, 0.5, 0.25]
    assert fuse_weights(3, "overlap-linear", 0).tolist() == [1, 1, 1]


def test_fuse_weights_positive_and_crossfade():
    for kind in ("flat", "pyramid", "overlap-linear"):
        for length in range(1, 20):
            assert (fuse_weights(length, kind, 4) > 0).all()
    # overlap-linear ramps of two windows overlapping by O frames sum to 1
    w = fuse_weights(16, "overlap-linear", 4)
    assert torch.allclose(w[-4:] + w[:4], torch.ones(4))
    with pytest.raises(ValueError, match="fuse kind"):
        fuse_weights(4, "gaussian")


# -- accumulator -----------------------------------------------------------------------------
def test_accumulator_weighted_average():
    acc = WindowAccumulator((1, 2, 6, 3, 3))
    w = fuse_weights(4, "pyramid")  # 1, 2, 2, 1
    acc.add([0, 1, 2, 3], torch.full((1, 2, 4, 3, 3), 1.0), w)
    acc.add([2, 3, 4, 5], torch.full((1, 2, 4, 3, 3), 3.0), w)
    out = acc.result()
    # frame 2: (2*1 + 1*3) / 3; frame 3: (1*1 + 2*3) / 3
    expected = torch.tensor([1.0, 1.0, 5 / 3, 7 / 3, 3.0, 3.0])
    assert out.shape == (1, 2, 6, 3, 3)
    assert torch.allclose(out, expected.view(1, 1, 6, 1, 1).expand_as(out))


def test_accumulator_unweighted_wrapped_window():
    acc = WindowAccumulator.like(torch.zeros(1, 1, 5, 1, 1))
    acc.add([3, 4, 0], torch.tensor([4.0, 6.0, 2.0]).view(1, 1, 3, 1, 1))
    acc.add([0, 1, 2], torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 3, 1, 1))
    assert acc.result().flatten().tolist() == [1.0, 1.0, 1.0, 4.0, 6.0]


def test_accumulator_single_window_is_identity_and_errors():
    x = torch.randn(2, 4, 8, 2, 2)
    acc = WindowAccumulator.like(x)
    acc.add(range(8), x)
    assert torch.equal(acc.result(), x)
    acc = WindowAccumulator.like(x)
    acc.add(range(4), x[:, :, :4])
    with pytest.raises(ValueError, match=r"frames \[4, 5, 6, 7\]"):
        acc.result()
    with pytest.raises(ValueError, match="shape"):
        acc.add(range(3), x[:, :, :4])


def test_window_text():
    shared = torch.randn(2, 77, 8)
    assert window_text(shared, [1, 2], batch=2, num_frames=5) is shared
    per_frame = torch.arange(2 * 5).float().view(10, 1, 1).expand(10, 77, 8)
    picked = window_text(per_frame, [4, 0], batch=2, num_frames=5)
    assert picked[:, 0, 0].tolist() == [4, 0, 9, 5]
    with pytest.raises(ValueError, match="rows"):
        window_text(torch.randn(3, 77, 8), [0], batch=2, num_frames=5)


@pytest.mark.parametrize("off", [0, None, "0", "none"])
def test_context_length_zero_or_none_means_no_windows(off):
    """The CLI passes "0"/"none" as text (`--context-length 0`), Python 0 or None."""
    assert ContextOptions(context_length=off).context_length is None
