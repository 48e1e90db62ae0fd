"""LayerNorm with a run-time backend: torch, or Apex's fused kernel where Apex is installed.

The module keeps `weight`/`bias` exactly as `torch.nn.LayerNorm` does, so checkpoints move freely between
backends. Apex is used only for CUDA tensors (its kernel has no CPU path); everything else falls back to
`torch.nn.functional.layer_norm`.
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError

log = logging.getLogger(__name__)


class ApexMissingError(ConfigError, RuntimeError):
    """model.layer_norm=apex without a working NVIDIA Apex. A ConfigError, so the doors print it as one line."""


@functools.lru_cache(maxsize=1)
def _apex() -> tuple[object | None, str]:
    """(Apex's fused_layer_norm_affine, "") when Apex and its CUDA extension import, else (None, why not).

    Apex's Python module imports without the extension (it loads `fused_layer_norm_cuda` at the first forward),
    so an Apex built without --cuda_ext would be chosen and fail in the first step: check the extension too."""
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine  # type: ignore
    except Exception:  # apex absent, or PyPI's unrelated `apex` package
        return None, ("NVIDIA Apex is not installed (`pip install apex` on PyPI is an unrelated package); build it "
                      "from NVIDIA's apex repository with --cuda_ext")
    try:
        importlib.import_module("fused_layer_norm_cuda")
    except Exception as error:
        return None, (f"NVIDIA Apex is installed without its CUDA extension (import fused_layer_norm_cuda: "
                      f"{error}); rebuild it with --cuda_ext")
    return fused_layer_norm_affine, ""


def _apex_layer_norm():
    return _apex()[0]


def apex_available() -> bool:
    return _apex_layer_norm() is not None


def resolve_backend(backend: str) -> str:
    """'auto' -> 'apex' when Apex and its CUDA extension import and CUDA is present, else 'torch' (saying why,
    once, where Apex is there but unusable). 'apex' without a working Apex is an error."""
    if backend == "torch":
        return "torch"
    if backend == "apex":
        if not apex_available():
            raise ApexMissingError(f"model.layer_norm=apex, but {_apex()[1]}; or set model.layer_norm=auto (or "
                                   "torch) to use torch's LayerNorm.")
        return "apex"
    if backend == "auto":
        if not torch.cuda.is_available():
            return "torch"
        if not apex_available():
            if "without its CUDA extension" in _apex()[1]:
                _warn_once(f"model.layer_norm=auto uses torch's LayerNorm: {_apex()[1]}")
            return "torch"
        return "apex"
    raise ValueError(f"unknown layer_norm backend {backend!r}: use auto, torch or apex")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` that runs Apex's fused kernel on CUDA tensors when the backend is 'apex'."""

    backend: str = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "apex" and x.is_cuda:
            return _apex_layer_norm()(x, self.weight, self.bias, self.normalized_shape, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def layer_norm_class(backend: str) -> type[LayerNorm]:
    """A LayerNorm class bound to a resolved backend (layers take classes, not strings)."""
    resolved = resolve_backend(backend)
    return type(f"LayerNorm_{resolved}", (LayerNorm,), {"backend": resolved})
