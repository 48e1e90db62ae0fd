"""The manager-weight picture and histograms from weights that live on an accelerator (CUDA in real runs)."""
import torch

from managertower.engine.logging import RunLogger


class OnDevice(torch.Tensor):
    """A tensor that, like a CUDA tensor, refuses `.numpy()` until it is copied to the host with `.cpu()`."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def tolist(self):
        raise TypeError("a device tensor: copy it to the host first")

    def cpu(self, *args, **kwargs):
        return torch.Tensor(super().cpu(*args, **kwargs).as_subclass(torch.Tensor))


def test_manager_weight_picture_from_device_tensors(tmp_path):
    weights = {side: torch.softmax(torch.randn(2, 3), dim=-1).as_subclass(OnDevice) for side in ("text", "image")}
    logger = RunLogger(tmp_path, total_steps=10, tensorboard=True, progress=False)
    logger.manager_weights(5, weights, picture=True)
    logger.close()
    assert (tmp_path / "manager_weights.png").stat().st_size > 0
    assert (tmp_path / "manager_weights.json").exists()
