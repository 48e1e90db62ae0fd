"""Apex is chosen only when its CUDA extension imports: an Apex built without it falls back, saying why."""
import sys

import pytest
import torch

from managertower.model import layer_norm
from managertower.model.layer_norm import ApexMissingError, resolve_backend


@pytest.fixture
def fake_apex(tmp_path, monkeypatch):
    """An importable `apex` package whose Python module loads `fused_layer_norm_cuda` only when called, as
    NVIDIA's does; `with_extension` adds that module too."""
    package = tmp_path / "apex" / "normalization"
    package.mkdir(parents=True)
    (tmp_path / "apex" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "fused_layer_norm.py").write_text(
        "import importlib\n"
        "def fused_layer_norm_affine(x, weight, bias, shape, eps):\n"
        "    return importlib.import_module('fused_layer_norm_cuda').forward_affine(x, shape, weight, bias, eps)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "apex" or n.startswith("apex.") or n == "fused_layer_norm_cuda"]:
        monkeypatch.delitem(sys.modules, name)
    layer_norm._apex.cache_clear()
    layer_norm._warn_once.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def with_extension():
        (tmp_path / "fused_layer_norm_cuda.py").write_text("def forward_affine(*args):\n    raise NotImplementedError\n")
        layer_norm._apex.cache_clear()

    yield with_extension
    layer_norm._apex.cache_clear()


def test_apex_without_its_cuda_extension_is_not_chosen(fake_apex, caplog):
    with caplog.at_level("WARNING"):
        assert resolve_backend("auto") == "torch"
    assert "without its CUDA extension" in caplog.text and "--cuda_ext" in caplog.text
    with pytest.raises(ApexMissingError, match="without its CUDA extension"):
        resolve_backend("apex")
    fake_apex()  # the extension appears: Apex is usable
    assert resolve_backend("auto") == "apex" and resolve_backend("apex") == "apex"
