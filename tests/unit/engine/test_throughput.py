"""The throughput and MFU figures: the peak each GPU and precision is divided by (whole-name matches, so that an
H100 PCIe or an H200 NVL is not taken for an SXM part), and the logging window's clock, which leaves start-up,
evaluation and checkpoint time out of samples/s."""
from __future__ import annotations

import pytest
import torch

from managertower.engine import loop


@pytest.mark.parametrize("name, matmul, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "bf16", 835.0),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA H200 NVL", "bf16", 835.0),
    ("NVIDIA H200", "tf32", 494.7),
    ("NVIDIA H200", "fp32", 66.9),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
    ("NVIDIA A100-PCIE-40GB", "fp16", 312.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA L4", "fp32", 30.3),
    ("Tesla V100-SXM2-32GB", "fp16", 125.0),
])
def test_the_peak_is_the_named_gpus_for_the_runs_precision(name, matmul, tflops, monkeypatch):
    monkeypatch.delenv("MT_PEAK_TFLOPS", raising=False)
    peak, source = loop.peak_flops(matmul, name)
    assert peak == pytest.approx(tflops * 1e12) and name in source


@pytest.mark.parametrize("name, matmul", [("NVIDIA H100 80GB HBM3e Super", "bf16"), ("NVIDIA A10G", "bf16"),
                                          ("NVIDIA B300", "bf16"), ("Tesla V100-SXM2-32GB", "bf16")])
def test_a_gpu_or_precision_not_listed_gets_no_mfu_and_says_how_to_set_it(name, matmul, monkeypatch):
    monkeypatch.delenv("MT_PEAK_TFLOPS", raising=False)
    peak, source = loop.peak_flops(matmul, name)
    assert peak is None and (name in source)
    monkeypatch.setenv("MT_PEAK_TFLOPS", "400")
    assert loop.peak_flops(matmul, name) == (400e12, "MT_PEAK_TFLOPS")


def test_an_fp32_run_is_divided_by_the_tf32_peak_only_where_it_uses_tf32():
    assert loop.matmul_precision("bf16", tf32=True, on_gpu=True) == "bf16"
    assert loop.matmul_precision("fp32", tf32=False, on_gpu=True) == "fp32"
    assert loop.matmul_precision("fp32", tf32=True, on_gpu=True) == "tf32"
    assert loop.matmul_precision("fp32", tf32=True, on_gpu=False) == "fp32"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_window_times_only_training_steps(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop.time, "time", clock)
    out = {"loss": torch.tensor(2.0), "batch_size": 4, "tokens": torch.tensor(40)}
    window = loop._LogWindow()
    clock.now += 30.0  # start-up and JIT builds: the first step
    window.add(out, 4)
    window.restart_clock()  # as the loop does after the process's first optimizer step
    for _ in range(3):
        clock.now += 2.0
        window.add(out, 4)
    with window.untimed():  # an evaluation and a checkpoint
        clock.now += 50.0
    means, samples_per_s, tokens_per_s = window.reduce(torch.device("cpu"))
    assert means == {"loss": 2.0} and window.micro_steps == 4  # the losses keep the first step
    assert samples_per_s == pytest.approx(12 / 6.0) and tokens_per_s == pytest.approx(120 / 6.0)
    window.reset()
    assert window.reduce(torch.device("cpu")) == ({}, None, None)  # nothing timed: no rate
