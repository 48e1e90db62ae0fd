"""Which DeepSpeed files hold the fp32 master weights: optimizer partitions under both of DeepSpeed's names, in
rank order."""
from pathlib import Path

from managertower.engine.checkpoint import optimizer_files


def _touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_bf16_zero_partitions_are_found(tmp_path):
    """bf16 ZeRO-1/2 names its optimizer files bf16_zero_pp_rank_*: the "fp32" export fell back to the
    bf16-rounded module weights when only zero_pp_rank_* was looked for."""
    bf16 = _touch(tmp_path / "bf16" / "step-4", "mp_rank_00_model_states.pt",
                  "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    fp32 = _touch(tmp_path / "fp32" / "step-4", "mp_rank_00_model_states.pt",
                  "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    stage0 = _touch(tmp_path / "stage0" / "step-4", "mp_rank_00_model_states.pt")
    assert [p.name for p in optimizer_files(bf16)] == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                       "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert [p.name for p in optimizer_files(fp32)] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert optimizer_files(stage0) == []


def test_partitions_come_in_rank_order(tmp_path):
    """The master vectors are the ranks' slices concatenated in rank order: rank 10 after rank 9, not after 1."""
    names = [f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(12)]
    folder = _touch(tmp_path / "step-2", *reversed(names), "mp_rank_00_model_states.pt")
    assert [p.name for p in optimizer_files(folder)] == names


def test_a_run_folder_named_with_brackets_is_not_a_pattern(tmp_path):
    folder = _touch(tmp_path / "run[1]" / "checkpoints" / "step-2", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert [p.name for p in optimizer_files(folder)] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
