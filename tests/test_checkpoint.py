"""Checkpoints without a model: the crash-safe replace of a step saved again, and the resume position check.

(Real saves, kills and resumes run in tests/test_distributed.py.)
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dflash_ds import checkpoint
from dflash_ds.checkpoint import COMPLETE, STATE_FILE, find_checkpoint, save_checkpoint


class Crash(Exception):
    """Stands for the process dying at the injected point."""


class StubEngine:
    """What save_checkpoint reads of a DeepSpeed engine: its own files (a marker) and nothing to gather."""

    device = torch.device("cpu")
    lr_scheduler = None
    module = SimpleNamespace(model=None)

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def save_checkpoint(self, root, tag, **_):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_text(self.marker)


@pytest.fixture
def no_gather(monkeypatch):
    monkeypatch.setattr(checkpoint, "_gathered_adapter", lambda engine: {})
    monkeypatch.setattr(checkpoint, "gather_optimizer_state", lambda *args: {})


def _save(root: Path, marker: str, step: int = 4) -> Path:
    return save_checkpoint(StubEngine(marker), root, step, {"step": step, "marker": marker}, keep_last=2)


def _crash_when(monkeypatch, module_fn: str, predicate) -> None:
    """Make ``checkpoint.<module_fn>`` (``os.replace`` / ``shutil.rmtree``) die when ``predicate(args)`` holds."""
    module_name, fn_name = module_fn.split(".")
    module = getattr(checkpoint, module_name)
    real = getattr(module, fn_name)

    def maybe_crash(*args, **kwargs):
        if predicate(*args):
            raise Crash(module_fn)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, fn_name, maybe_crash)


def _assert_complete(path: Path | None, step: int, markers: set[str]) -> None:
    assert path is not None, "no complete checkpoint left: the re-save lost the step"
    assert (path / COMPLETE).exists()
    state = torch.load(path / STATE_FILE, weights_only=False)
    assert state["step"] == step and state["marker"] in markers
    assert (path / "mp_rank_00_model_states.pt").read_text() == state["marker"]  # one save's files, not a mix


def test_resave_crash_before_the_new_checkpoint_is_in_place_keeps_the_old(tmp_path, no_gather, monkeypatch):
    """A crash once the old step directory is out of the way but before the new one is renamed in: the old code
    had deleted it (rmtree, then rename), so nothing of step 4 was left to resume from."""
    root = tmp_path / "checkpoints"
    _save(root, "first")
    final = root / "step_00000004"
    _crash_when(monkeypatch, "os.replace", lambda src, dst, *a: Path(dst) == final and Path(src).name.endswith(".partial"))
    with pytest.raises(Crash):
        _save(root, "second")
    found = find_checkpoint("auto", tmp_path)
    _assert_complete(found, 4, {"first"})
    _assert_complete(find_checkpoint(str(final), tmp_path), 4, {"first"})  # the path the user knows still works

    # the next save of that step (the resumed run) puts the new one in place and clears what the crash left
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint, "_gathered_adapter", lambda engine: {})
    monkeypatch.setattr(checkpoint, "gather_optimizer_state", lambda *args: {})
    _save(root, "third")
    _assert_complete(find_checkpoint("auto", tmp_path), 4, {"third"})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]


def test_resave_crash_before_the_old_copy_is_deleted_resumes_from_the_new(tmp_path, no_gather, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, "first")
    _crash_when(monkeypatch, "shutil.rmtree", lambda path, *a, **k: Path(path).name == "step_00000004.old")
    with pytest.raises(Crash):
        _save(root, "second")
    _assert_complete(find_checkpoint("auto", tmp_path), 4, {"second"})


def test_pruning_and_the_newest_step_see_one_checkpoint_per_step(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_00000002", "step_00000004.old", "step_00000006.partial", "step_00000010", "other"):
        (root / name).mkdir(parents=True)
        if not name.endswith(".partial"):
            (root / name / COMPLETE).write_text("\n")
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_00000002", "step_00000004.old",
                                                                       "step_00000010"]
    assert find_checkpoint("auto", tmp_path).name == "step_00000010"
    checkpoint._prune(root, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["other", "step_00000006.partial", "step_00000010"]


# ----------------------------------------------------------------------------------------------------------------
# resume on another layout: the same step must be the same sample


def test_resume_same_global_batch_continues_at_the_saved_step():
    from dflash_ds.sampler import resume_step

    saved = {"step": 2, "samples": 8}  # global batch 4
    assert resume_step(saved, micro=1, accum=2, dp=2, where="ckpt") == 2  # the layout it was saved on
    assert resume_step(saved, micro=1, accum=4, dp=1, where="ckpt") == 2  # 2 ranks -> 1, accumulation doubled
    assert resume_step(saved, micro=2, accum=1, dp=2, where="ckpt") == 2  # bigger micro-batches, same batch


@pytest.mark.parametrize(
    "micro,accum,dp,fix",
    [
        (1, 2, 1, "--grad-accum 4"),  # 2 ranks -> 1 without doubling the accumulation
        (2, 1, 4, "--micro-batch-size 1 --grad-accum 1"),  # 4 ranks: one sequence each
        (3, 1, 2, "--micro-batch-size 2 --grad-accum 1"),  # no whole accumulation at micro-batch 3
        (1, 1, 3, "resume on a number of data-parallel ranks that divides 4"),
    ],
)
def test_resume_other_global_batch_names_the_exact_flags(micro, accum, dp, fix):
    from dflash_ds.sampler import resume_step

    with pytest.raises(ValueError) as err:
        resume_step({"step": 2, "samples": 8}, micro=micro, accum=accum, dp=dp, where="out/step_00000002")
    message = str(err.value)
    assert message.startswith("--resume out/step_00000002:") and fix in message
    assert "global batch 4" in message and "sequence 8" in message
