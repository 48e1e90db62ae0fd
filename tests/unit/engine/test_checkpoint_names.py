"""Which DeepSpeed files hold the fp32 master weights: ZeRO partitions under both of DeepSpeed's names."""
from pathlib import Path

from managertower.engine.checkpoint import zero_partitioned


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
    assert zero_partitioned(bf16) and zero_partitioned(fp32) and not zero_partitioned(stage0)


def test_a_run_folder_named_with_brackets_is_not_a_pattern(tmp_path):
    folder = _touch(tmp_path / "run[1]" / "checkpoints" / "step-2", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert zero_partitioned(folder)
