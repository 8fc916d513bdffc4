"""Tests for animatediff.checkpoints.io: real files in tmp_path, no mocks."""

from __future__ import annotations

import builtins
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from animatediff.checkpoints.io import (
    CheckpointError,
    check_keys,
    describe_dtypes,
    first_keys,
    load_state_dict,
    read_metadata,
    save_state_dict,
    unwrap_state_dict,
)


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.weight": torch.randn(4, 3, generator=g),
        "blocks.0.bias": torch.randn(4, generator=g).half(),
        "blocks.1.weight": torch.randn(2, 4, generator=g).to(torch.bfloat16),
        "steps": torch.arange(5),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _raises_naming(path: Path, *fragments: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    err = info.value
    assert str(err).startswith(str(path)), str(err)
    assert err.path == str(path)
    for fragment in fragments:
        assert fragment in str(err), str(err)
    return err


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", ["w.safetensors", "w.ckpt", "w.pt", "w.pth", "w.bin"])
def test_round_trip_keeps_values_and_dtypes(tmp_path: Path, name: str) -> None:
    sd = _sd()
    written = save_state_dict(sd, tmp_path / name)
    assert written == tmp_path / name
    loaded = load_state_dict(written)
    _assert_same(sd, loaded)
    assert loaded["blocks.0.bias"].dtype == torch.float16


def test_metadata_round_trip(tmp_path: Path) -> None:
    meta = {"format": "pt", "animatediff.version": "v3"}
    path = save_state_dict(_sd(), tmp_path / "m.safetensors", metadata=meta)
    assert read_metadata(path) == meta
    assert read_metadata(save_state_dict(_sd(), tmp_path / "plain.safetensors")) == {}
    assert read_metadata(save_state_dict(_sd(), tmp_path / "m.ckpt")) == {}


def test_metadata_refused_for_pickles(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="m.ckpt"):
        save_state_dict(_sd(), tmp_path / "m.ckpt", metadata={"a": "b"})


def test_save_creates_parents_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "w.safetensors"
    save_state_dict(_sd(), path)
    save_state_dict(_sd(), path)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"]


def test_failed_save_removes_temp_file(tmp_path: Path) -> None:
    # A non-empty directory at the target makes the final os.replace fail after writing.
    target = tmp_path / "w.ckpt"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        save_state_dict(_sd(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.ckpt"]


def test_overwrite_false_refuses_existing_file(tmp_path: Path) -> None:
    path = save_state_dict({"a": torch.zeros(1)}, tmp_path / "w.safetensors")
    with pytest.raises(FileExistsError, match="w.safetensors"):
        save_state_dict({"a": torch.ones(1)}, path, overwrite=False)
    assert torch.equal(load_state_dict(path)["a"], torch.zeros(1))


@pytest.mark.parametrize("name", ["w.safetensors", "w.ckpt"])
def test_save_handles_shared_and_strided_tensors(tmp_path: Path, name: str) -> None:
    fused = torch.arange(12.0).reshape(3, 4)
    sd = {"q": fused[0], "k": fused[1], "t": fused.t(), "tied": fused, "tied2": fused}
    loaded = load_state_dict(save_state_dict(sd, tmp_path / name))
    _assert_same({k: v.contiguous() for k, v in sd.items()}, loaded)


def test_save_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        save_state_dict(_sd(), tmp_path / "w.txt")
    with pytest.raises(ValueError, match="empty"):
        save_state_dict({}, tmp_path / "w.ckpt")
    with pytest.raises(TypeError, match="step"):
        save_state_dict({"step": 3}, tmp_path / "w.ckpt")  # type: ignore[dict-item]


# ------------------------------------------------------------------------------ wrappers


def test_state_dict_wrapper(tmp_path: Path) -> None:
    sd = _sd()
    torch.save({"state_dict": sd, "global_step": 100}, tmp_path / "w.ckpt")
    _assert_same(sd, load_state_dict(tmp_path / "w.ckpt"))


def test_ddp_module_prefix_inside_wrapper(tmp_path: Path) -> None:
    sd = _sd()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.ckpt")
    _assert_same(sd, load_state_dict(tmp_path / "w.ckpt"))


def test_model_wrapper_drops_non_tensors(tmp_path: Path) -> None:
    sd = _sd()
    torch.save({"model": sd, "epoch": 3}, tmp_path / "w.pt")
    _assert_same(sd, load_state_dict(tmp_path / "w.pt"))


def test_compile_prefix_and_double_wrapping() -> None:
    sd = _sd()
    obj = {"state_dict": {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}}
    _assert_same(sd, unwrap_state_dict(obj, "x.ckpt"))
    compiled = {f"_orig_mod.{k}": v for k, v in sd.items()}
    _assert_same(sd, unwrap_state_dict(compiled, "x.ckpt"))


def test_prefix_kept_unless_on_all_keys() -> None:
    sd = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert unwrap_state_dict(sd, "x.ckpt").keys() == sd.keys()


def test_flat_dict_with_non_tensor_entries() -> None:
    sd = {"a": torch.zeros(1), "global_step": 7, "model": "name"}
    assert list(unwrap_state_dict(sd, "x.ckpt")) == ["a"]


# ------------------------------------------------------------------------------ sniffing


def test_safetensors_named_ckpt_loads(tmp_path: Path) -> None:
    sd = _sd()
    save_state_dict(sd, tmp_path / "real.safetensors", metadata={"k": "v"})
    (tmp_path / "real.safetensors").rename(tmp_path / "x.ckpt")
    _assert_same(sd, load_state_dict(tmp_path / "x.ckpt"))
    assert read_metadata(tmp_path / "x.ckpt") == {"k": "v"}


def test_pickle_named_safetensors_loads(tmp_path: Path) -> None:
    sd = _sd()
    torch.save(sd, tmp_path / "x.safetensors")
    _assert_same(sd, load_state_dict(tmp_path / "x.safetensors"))


def test_legacy_torch_format_loads(tmp_path: Path) -> None:
    sd = _sd()
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    _assert_same(sd, load_state_dict(tmp_path / "old.pt"))


# ------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path: Path) -> None:
    _raises_naming(tmp_path / "nope.ckpt", "file not found")
    with pytest.raises(CheckpointError, match="file not found"):
        read_metadata(tmp_path / "nope.safetensors")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "d.ckpt").mkdir()
    _raises_naming(tmp_path / "d.ckpt", "directory")


@pytest.mark.parametrize("name", ["e.ckpt", "e.safetensors"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    _raises_naming(tmp_path / name, "empty")


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = save_state_dict({"w": torch.randn(64, 64)}, tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises_naming(path, "not a valid checkpoint", "truncated")


def test_safetensors_with_cut_header(tmp_path: Path) -> None:
    path = save_state_dict({"w": torch.randn(4)}, tmp_path / "t.safetensors")
    path.write_bytes(path.read_bytes()[:20])
    _raises_naming(path, "header")
    with pytest.raises(CheckpointError, match="header"):
        read_metadata(path)


def test_safetensors_with_corrupt_header(tmp_path: Path) -> None:
    body = b'{"w": not json}'
    path = tmp_path / "c.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    _raises_naming(path, "corrupt safetensors header")


@pytest.mark.parametrize("name", ["r.ckpt", "r.safetensors", "r.bin"])
def test_random_bytes(tmp_path: Path, name: str) -> None:
    rng = random.Random(1234)
    data = bytes(rng.randrange(256) for _ in range(4096))
    assert data[0] != 0x80 and data[8] != ord("{")  # really no known magic
    (tmp_path / name).write_bytes(data)
    _raises_naming(tmp_path / name, "not a valid checkpoint", "unrecognised")


def test_text_file(tmp_path: Path) -> None:
    (tmp_path / "t.pt").write_text("hello, I am not a checkpoint\n")
    _raises_naming(tmp_path / "t.pt", "not a valid checkpoint")


def test_truncated_zip_ckpt(tmp_path: Path) -> None:
    path = save_state_dict({"w": torch.randn(64, 64)}, tmp_path / "t.ckpt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises_naming(path, "not a valid checkpoint", "zip")


def test_truncated_legacy_pickle(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises_naming(path, "not a valid checkpoint")


def test_dict_without_tensors(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "state_dict": {}, "name": "x"}, tmp_path / "n.ckpt")
    _raises_naming(tmp_path / "n.ckpt", "no tensors", "epoch")


def test_non_dict_object(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "l.ckpt")
    _raises_naming(tmp_path / "l.ckpt", "list")


def test_error_survives_pickling() -> None:
    err = CheckpointError("mm.ckpt", "not a valid checkpoint (x)")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.message, str(copy)) == (err.path, err.message, str(err))
    assert str(err) == "mm.ckpt: not a valid checkpoint (x)"
    assert isinstance(err, ValueError)


# ------------------------------------------------------------------------------ security


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _write_legacy(obj: object, path: Path, protocol: int) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", [_RunsShell, _RunsExec])
@pytest.mark.parametrize(
    "writer",
    [
        pytest.param(lambda o, p: _write_legacy(o, p, 2), id="pickle-p2"),
        pytest.param(lambda o, p: _write_legacy(o, p, pickle.HIGHEST_PROTOCOL), id="pickle-max"),
        pytest.param(lambda o, p: torch.save(o, p), id="torch-zip"),
        pytest.param(
            lambda o, p: torch.save(o, p, _use_new_zipfile_serialization=False),
            id="torch-legacy",
        ),
    ],
)
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, payload, writer) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    writer({"weight": torch.zeros(2), "evil": payload(marker)}, path)
    err = _raises_naming(path, "refused for safety", "not plain tensors", "none of it was run")
    assert "weights_only=False" not in str(err)
    assert not marker.exists()


def test_malicious_pickle_as_top_level_object(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_RunsShell(marker), path)
    _raises_naming(path, "refused for safety", "system")
    assert not marker.exists()


# ------------------------------------------------------------------------------ key checks


def test_check_keys_passes_when_equal() -> None:
    sd = _sd()
    check_keys("m.ckpt", {k: v.shape for k, v in sd.items()}, sd, "motion module v2")
    check_keys("m.ckpt", sd, sd, "motion module v2")


def test_check_keys_missing() -> None:
    sd = _sd()
    expected = {**sd, "extra.a": torch.zeros(1), "extra.b": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        check_keys("mm.ckpt", expected, sd, "motion module v2")
    msg = str(info.value)
    assert msg.startswith("mm.ckpt: ") and "motion module v2" in msg
    assert "2 missing keys: extra.a, extra.b" in msg
    assert "unexpected" not in msg and "shape" not in msg


def test_check_keys_unexpected_lists_first_keys() -> None:
    expected = {"a": torch.Size([1])}
    actual = {"a": torch.zeros(1), **{f"u{i:02d}": torch.zeros(1) for i in range(8)}}
    with pytest.raises(CheckpointError, match="8 unexpected keys: u00, u01, u02, u03, u04, "):
        check_keys("mm.ckpt", expected, actual, "motion module v1")
    with pytest.raises(CheckpointError, match=r"and 3 more"):
        check_keys("mm.ckpt", expected, actual, "motion module v1")


def test_check_keys_shape_mismatch_shows_both_shapes() -> None:
    expected = {"w": torch.Size([320, 320]), "b": torch.Size([320])}
    actual = {"w": torch.zeros(640, 320), "b": torch.zeros(320)}
    with pytest.raises(CheckpointError) as info:
        check_keys("mm.ckpt", expected, actual, "motion module v3")
    assert "1 shape mismatch: w (file [640, 320] vs expected [320, 320])" in str(info.value)


def test_check_keys_reports_all_categories() -> None:
    expected = {"a": torch.Size([1]), "b": torch.Size([2])}
    actual = {"b": torch.zeros(3), "c": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        check_keys("x.safetensors", expected, actual, "SparseCtrl encoder")
    msg = str(info.value)
    assert "1 missing key: a" in msg and "1 unexpected key: c" in msg and "b (file [3]" in msg


# ------------------------------------------------------------------------------ helpers


def test_describe_dtypes() -> None:
    assert describe_dtypes({"a": torch.zeros(1, dtype=torch.float16)}) == "fp16"
    assert describe_dtypes({"a": torch.zeros(1)}) == "fp32"
    mixed = {"a": torch.zeros(1), "b": torch.zeros(1).half(), "c": torch.zeros(1).half()}
    assert describe_dtypes(mixed) == "mixed (fp16, fp32)"
    assert describe_dtypes({"a": torch.zeros(1).bfloat16(), "i": torch.arange(2)}) == (
        "mixed (bf16, int64)"
    )
    assert describe_dtypes({}) == "empty"


def test_first_keys() -> None:
    assert first_keys(["c", "a", "b"]) == "a, b, c"
    assert first_keys([f"k{i}" for i in range(7, 0, -1)], n=2) == "k1, k2, ... and 5 more"
    assert first_keys([]) == "(none)"


def test_load_to_other_device(tmp_path: Path) -> None:
    path = save_state_dict(_sd(), tmp_path / "w.safetensors")
    loaded = load_state_dict(path, device=torch.device("meta"))
    assert all(t.is_meta for t in loaded.values())
    assert loaded["blocks.0.bias"].dtype == torch.float16


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_file_gets_normal_permissions(tmp_path: Path) -> None:
    path = save_state_dict(_sd(), tmp_path / "w.ckpt")
    reference = tmp_path / "ref"
    reference.write_bytes(b"x")
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
