"""A task's tower from a pre-trained checkpoint (Task.load_tower_weights and the NLVR2 / retrieval overrides)."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO
from managertower.config import load_config
from managertower.tasks import build_task

from test_finetune import tiny_config


@pytest.fixture(scope="module")
def world(synthetic_world):
    return synthetic_world[1]


def test_weights_from_a_pretrained_checkpoint(world, tmp_path):
    """A 64-px pre-training state -> a 96-px task: position embeddings resized, NLVR2's second image type row
    copied from the image row, the pre-training ITM head reused for retrieval, heads otherwise new."""
    from managertower.tasks.pretrain import PretrainTask

    pre = PretrainTask(load_config(str(REPO / "pretrain/configs/tiny.yaml"), ["run.dir=" + str(tmp_path / "p")]))
    state = pre.state_dict()
    nlvr2 = build_task(tiny_config("nlvr2", world, tmp_path, "model.image_size=96"))
    missing = nlvr2.load_tower_weights(state)
    pos = nlvr2.model.vision_expert.visual.positional_embedding
    assert pos.shape[0] == 12 * 12 + 1 and state["model.vision_expert.visual.positional_embedding"].shape[0] == 65
    torch.testing.assert_close(pos[0], state["model.vision_expert.visual.positional_embedding"][0])  # class token
    types = nlvr2.model.type_embedding.weight
    torch.testing.assert_close(types[2], state["model.type_embedding.weight"][1])
    torch.testing.assert_close(types[0], state["model.type_embedding.weight"][0])
    assert missing == []  # every tower tensor came from the checkpoint; the classifier is new
    retrieval = build_task(tiny_config("flickr30k", world, tmp_path))
    retrieval.load_tower_weights(state)
    torch.testing.assert_close(retrieval.itm_head.fc.weight, state["itm_head.fc.weight"])


def test_heads_a_checkpoint_holds_whole_start_from_it(world, tmp_path):
    """Retrieval takes the pre-training ITM and ITC heads; a fine-tuned checkpoint's own classifier loads (an
    NLVR2 one keeps its trained second-image row); another task's classifier (other shapes) starts new."""
    from managertower.tasks.pretrain import PretrainTask

    pre = PretrainTask(load_config(str(REPO / "pretrain/configs/tiny.yaml"), ["run.dir=" + str(tmp_path / "p")]))
    retrieval = build_task(tiny_config("flickr30k", world, tmp_path))
    retrieval.load_tower_weights(pre.state_dict())
    assert retrieval.heads_from_checkpoint == ["itm_head"]  # the demo's ITC head is 256 wide, retrieval's 32
    pre = PretrainTask(load_config(str(REPO / "pretrain/configs/tiny.yaml"), ["run.dir=" + str(tmp_path / "p"),
                                                                              "task.itc_dim=32"]))
    retrieval.load_tower_weights(pre.state_dict())
    assert retrieval.heads_from_checkpoint == ["itm_head", "itc_head"]
    torch.testing.assert_close(retrieval.itc_head.text_proj.weight, pre.itc_head.text_proj.weight)

    trained = build_task(tiny_config("nlvr2", world, tmp_path))
    with torch.no_grad():
        for param in trained.parameters():
            param.normal_()
    nlvr2 = build_task(tiny_config("nlvr2", world, tmp_path))
    nlvr2.load_tower_weights(trained.state_dict())
    assert nlvr2.heads_from_checkpoint == ["classifier"]
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(nlvr2.state_dict()[name], value, msg=name)  # row 2 included
    snli_ve = build_task(tiny_config("snli_ve", world, tmp_path))
    before = snli_ve.classifier.state_dict()
    snli_ve.load_tower_weights(trained.state_dict())
    assert snli_ve.heads_from_checkpoint == []
    assert all(torch.equal(before[k], v) for k, v in snli_ve.classifier.state_dict().items())
