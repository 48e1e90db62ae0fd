"""The run logger: a resumed run's metrics.jsonl holds no line past the checkpoint it resumed from."""
from __future__ import annotations

import json

from managertower.engine.logging import RunLogger


def test_resumed_logger_drops_lines_past_the_checkpoint(tmp_path):
    logger = RunLogger(tmp_path, total_steps=10, tensorboard=False, progress=False)
    for step in range(1, 8):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 8, "loss"')  # a line cut by a crash
    RunLogger(tmp_path, total_steps=10, start_step=5, tensorboard=False, progress=False).close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
