"""Checkpoint files: atomic writes, safe reads, safetensors."""
import os

import pytest
import torch

from cascadevision.engine.checkpoint import atomic_copy, load_checkpoint, save_checkpoint
from cascadevision.errors import CheckpointError


def example_state(value: float = 1.0) -> dict:
    return {"state_dict": {"conv.weight": torch.full((2, 3), value), "conv.bias": torch.zeros(2)},
            "meta": {"iteration": 7, "epoch": 1, "class_names": ["cat", "dog"], "cat_ids": [3, 7],
                     "config": {"train": {"lr": 0.02, "lr_steps": [8, 11]}}, "cascadevision_version": "0.1.0"},
            "rng": {"python": (3, tuple(range(5)), None), "numpy": {"key": [1, 2, 3], "pos": 4}}}


def assert_same(loaded: dict, expected: dict):
    assert loaded["meta"] == expected["meta"]
    assert loaded.get("rng") == expected.get("rng")
    assert loaded["state_dict"].keys() == expected["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(loaded["state_dict"][name], tensor), name


def test_save_then_load_round_trip(tmp_path):
    state = example_state()
    save_checkpoint(tmp_path / "sub/ckpt.pth", state)
    assert_same(load_checkpoint(tmp_path / "sub/ckpt.pth"), state)
    assert os.listdir(tmp_path / "sub") == ["ckpt.pth"]  # no temporary file left behind


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint(path, example_state(1.0))

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, example_state(2.0))
    monkeypatch.undo()
    assert_same(load_checkpoint(path), example_state(1.0))
    assert os.listdir(tmp_path) == ["latest.pth"]


class RunsCode:
    """Unpickling this object would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "code-was-run"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "system" in message and "could run code" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "empty", "directory"])
def test_unreadable_checkpoint_is_a_one_line_error(tmp_path, damage):
    path = tmp_path / "ckpt.pth"
    if damage != "missing":
        save_checkpoint(path, example_state())
        data = path.read_bytes()
        if damage == "directory":
            path.unlink()
            path.mkdir()
        else:
            path.write_bytes({"truncated": data[:len(data) // 2], "garbage": os.urandom(200), "empty": b""}[damage])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_plain_state_dict_files_load_too(tmp_path):
    torch.save({"backbone.conv1.weight": torch.ones(2)}, tmp_path / "weights.pth")
    assert torch.equal(load_checkpoint(tmp_path / "weights.pth")["backbone.conv1.weight"], torch.ones(2))
    torch.save(torch.ones(2), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "tensor.pth")


def test_safetensors_holds_weights_and_meta(tmp_path):
    state = example_state()
    del state["rng"]
    tied = torch.arange(4.0)
    state["state_dict"].update({"embed.weight": tied, "head.weight": tied})  # shared memory is fine
    save_checkpoint(tmp_path / "model.safetensors", state)
    assert_same(load_checkpoint(tmp_path / "model.safetensors"), state)

    with pytest.raises(ValueError, match="only 'state_dict' and 'meta'"):
        save_checkpoint(tmp_path / "full.safetensors", {**state, "optimizer": {}})
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="bad.safetensors: truncated or corrupt"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_atomic_copy(tmp_path):
    save_checkpoint(tmp_path / "iter_0000010.pth", example_state(3.0))
    atomic_copy(tmp_path / "iter_0000010.pth", tmp_path / "latest.pth")
    (tmp_path / "iter_0000010.pth").unlink()  # pruning the iteration file keeps latest intact
    assert_same(load_checkpoint(tmp_path / "latest.pth"), example_state(3.0))
    assert os.listdir(tmp_path) == ["latest.pth"]
