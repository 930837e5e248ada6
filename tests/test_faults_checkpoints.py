"""Issue #33 for checkpoints: a content digest checked on load, non-finite models refused,
and a non-finite run that says what it keeps. Each test fails on the code before the issue."""

import json
import math

import pytest
import torch

from metalearn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metalearn.cli import main
from metalearn.models import MLP
from metalearn.training import NonFiniteError, train

FAST = dict(dataset="sine", iterations=20, val_every=10, val_tasks=10, meta_batch=5)


# --- content digest ---------------------------------------------------------------------


def test_edited_tensor_bytes_are_detected(tmp_path):
    path = tmp_path / "a.pt"
    train(progress=False, checkpoint=path, **FAST)
    raw = bytearray(path.read_bytes())
    weight = load_checkpoint(path)["model"]["2.weight"].numpy().tobytes()
    at = raw.find(weight)
    assert at > 0
    raw[at + 100: at + 104] = b"\x01\x02\x03\x04"  # 4 bytes inside a tensor
    path.write_bytes(bytes(raw))
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(CheckpointError, match="fails its content check"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="fails its content check"):
        train(progress=False, checkpoint=path, resume=True, **FAST)


def test_edited_values_outside_tensors_are_detected(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(path, {"format": 2, "config": {"inner_lr": 0.25}, "model": {}})
    raw = path.read_bytes()
    assert raw.count(b"inner_lr") == 1
    path.write_bytes(raw.replace(b"inner_lr", b"inner_lX"))
    with pytest.raises(CheckpointError, match="fails its content check"):
        load_checkpoint(path)


def test_digest_sits_beside_the_model_and_plain_torch_load_still_works(tmp_path):
    path = tmp_path / "a.pt"
    train(progress=False, checkpoint=path, **FAST)
    for p in (path, path.with_suffix(".best.pt")):
        raw = torch.load(p, weights_only=True)
        assert raw["format"] == 2 and raw["digest"].startswith("crc32:")
        MLP().load_state_dict(raw["model"])  # the one-liner used on best checkpoints
        assert "digest" not in load_checkpoint(p)


def test_format_1_checkpoints_without_digest_still_load_and_resume(tmp_path):
    path = tmp_path / "a.pt"
    full = train(progress=False, checkpoint=tmp_path / "full.pt", **{**FAST, "iterations": 30})
    train(progress=False, checkpoint=path, **FAST)
    state = torch.load(path, weights_only=True)
    del state["digest"]
    torch.save({**state, "format": 1}, path)  # as the code before digests wrote it
    assert load_checkpoint(path)["format"] == 1
    resumed = train(progress=False, checkpoint=path, resume=True, **{**FAST, "iterations": 30})
    for name, p in full.model.named_parameters():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name], p,
                                   rtol=0, atol=0)
    assert load_checkpoint(path)["format"] == 2  # what it writes from then on is verified


def test_format_2_without_digest_or_newer_format_is_refused(tmp_path):
    torch.save({"format": 2, "model": {}}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="has no content digest"):
        load_checkpoint(tmp_path / "a.pt")
    save_checkpoint(tmp_path / "b.pt", {"format": 9, "model": {}})
    with pytest.raises(CheckpointError, match="format 9, which this metalearn cannot read"):
        load_checkpoint(tmp_path / "b.pt")


# --- non-finite values ------------------------------------------------------------------


def nan_checkpoint(path, fmt=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    train(progress=False, checkpoint=path, **FAST)
    state = load_checkpoint(path)
    state["model"]["0.weight"].fill_(float("nan"))
    if fmt == 2:
        save_checkpoint(path, state)
    else:
        torch.save({**state, "format": 1}, path)


@pytest.mark.parametrize("fmt", [1, 2])
def test_non_finite_checkpoint_is_refused_on_load_and_resume(tmp_path, fmt):
    path = tmp_path / "a.pt"
    nan_checkpoint(path, fmt)
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN or inf\) in "
                                              r"model\.0\.weight"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="non-finite"):
        train(progress=False, checkpoint=path, resume=True, **{**FAST, "iterations": 30})


def test_eval_of_a_non_finite_checkpoint_exits_1(tmp_path, capsys):
    path = tmp_path / "a.pt"
    nan_checkpoint(path)
    code = main(["eval", "--checkpoint", str(path), "--tasks", "5", "--steps", "1",
                 "--no-progress", "--no-malloc-reuse"])
    err = capsys.readouterr()
    assert code == 1 and "non-finite values" in err.err and "nan" not in err.out


def test_non_finite_validation_is_never_best(tmp_path):
    path = tmp_path / "a.pt"
    # The update of iteration 1 makes validation inf/NaN; iteration 2's loss then stops it.
    with pytest.raises(NonFiniteError) as info:
        train(progress=False, checkpoint=path, **{**FAST, "val_every": 1, "outer_lr": 1e9})
    records = [json.loads(x) for x in path.with_suffix(".jsonl").read_text().splitlines()]
    assert records[0]["split"] == "val" and not math.isfinite(records[0]["mse"])
    assert not path.with_suffix(".best.pt").exists()
    assert load_checkpoint(path)["best"] is None
    assert f"the checkpoint {path} (iteration 1) is kept" in str(info.value)
    assert "no best model" in str(info.value)


def test_non_finite_stop_says_when_no_checkpoint_exists(tmp_path):
    path = tmp_path / "a.pt"
    with pytest.raises(NonFiniteError) as info:
        train(progress=False, checkpoint=path, **{**FAST, "inner_lr": 1e30, "inner_steps": 3})
    assert "no checkpoint was written yet" in str(info.value)
    assert "is kept" not in str(info.value) and not path.exists()


def test_non_finite_stop_names_the_checkpoint_and_best_kept(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    real_step = torch.optim.Adam.step
    calls = []

    def step_then_poison(self, *args, **kwargs):  # the loss turns NaN after iteration 12
        calls.append(1)
        out = real_step(self, *args, **kwargs)
        if len(calls) == 12:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_poison)
    with pytest.raises(NonFiniteError) as info:
        train(progress=False, checkpoint=path, **FAST)
    message = str(info.value)
    assert "at iteration 13" in message
    assert f"the checkpoint {path} (iteration 10) is kept" in message
    assert f"the best model {path.with_suffix('.best.pt')} (iteration 10)" in message
    assert load_checkpoint(path)["iteration"] == 10


def test_a_model_made_non_finite_by_an_update_is_not_saved(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    real_step = torch.optim.Adam.step
    calls = []

    def overflow_at_10(self, *args, **kwargs):  # finite gradients, an overflowing update
        calls.append(1)
        out = real_step(self, *args, **kwargs)
        if len(calls) == 10:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", overflow_at_10)
    with pytest.raises(NonFiniteError, match="after the update of iteration 10; no checkpoint"):
        train(progress=False, checkpoint=path, **FAST)
    assert not path.exists() and not path.with_suffix(".best.pt").exists()
