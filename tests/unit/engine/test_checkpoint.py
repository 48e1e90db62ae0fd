"""find_checkpoint: the one way a checkpoint a user names (resume=PATH, init_from / --from, export) is found."""
from __future__ import annotations

import pytest

from managertower.config import ConfigError
from managertower.engine import checkpoint as ckpt


def _run_folder(root):
    """RUN/checkpoints with step-2 and step-4 complete, step-6 half-written and a save in progress."""
    checkpoints = root / "run" / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = checkpoints / f"step-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / ckpt.COMPLETE).write_text("")
    (checkpoints / ".tmp-step-8").mkdir()
    return root / "run"


def test_find_checkpoint_takes_a_step_folder_a_checkpoints_folder_or_a_run_folder(tmp_path):
    run = _run_folder(tmp_path)
    checkpoints = run / "checkpoints"
    assert ckpt.find_checkpoint(checkpoints / "step-2") == checkpoints / "step-2"  # a complete step-N: itself
    assert ckpt.find_checkpoint(checkpoints) == checkpoints / "step-4"  # the newest complete one
    assert ckpt.find_checkpoint(str(run)) == checkpoints / "step-4"  # a run folder: its checkpoints/
    (checkpoints / "latest").write_text("step-2")
    assert ckpt.find_checkpoint(run) == checkpoints / "step-2"  # `latest` when it names a complete one


@pytest.mark.parametrize("where, message", [("run/checkpoints/step-6", "is not a complete checkpoint"),
                                            ("empty", "is not a complete checkpoint"),
                                            ("nowhere", "does not exist")])
def test_find_checkpoint_fails_with_one_user_error(tmp_path, where, message):
    _run_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointNotFound, match=message) as error:
        ckpt.find_checkpoint(tmp_path / where)
    # one line naming the path and what to give; a user error (ConfigError) the doors print without a traceback
    assert str(tmp_path / where) in str(error.value) and "\n" not in str(error.value)
    assert "give a step-N folder" in str(error.value)
    assert isinstance(error.value, ConfigError) and isinstance(error.value, FileNotFoundError)


def test_resume_and_weights_go_through_find_checkpoint(tmp_path):
    run = _run_folder(tmp_path)
    assert ckpt.resolve_resume("none", run / "checkpoints") is None
    assert ckpt.resolve_resume("auto", tmp_path / "fresh" / "checkpoints") is None  # before the first save
    assert ckpt.resolve_resume(str(run), tmp_path / "other") == run / "checkpoints" / "step-4"
    with pytest.raises(ckpt.CheckpointNotFound, match="is not a complete checkpoint"):
        ckpt.load_weights_file(tmp_path)


def test_find_resume_ignores_incomplete_checkpoints(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"step-{step}"
        folder.mkdir()
        if complete:
            (folder / ckpt.COMPLETE).write_text("")
    (tmp_path / ".tmp-step-8").mkdir()
    assert ckpt.find_resume(tmp_path).name == "step-4"
    (tmp_path / "latest").write_text("step-2")
    assert ckpt.find_resume(tmp_path).name == "step-2"  # latest names a complete one
    (tmp_path / "latest").write_text("step-6")
    assert ckpt.find_resume(tmp_path).name == "step-4"  # latest names an incomplete one: the newest complete
    assert ckpt.resolve_resume("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "step-6"), tmp_path)
