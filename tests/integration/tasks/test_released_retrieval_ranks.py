"""Retrieval evaluation (RetrievalTask.evaluate) against the released ranking computed by brute force, and the
same recalls and rankings from two gloo ranks as from one (the tiny Flickr30K task on the synthetic world)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from managertower.config import load_config
from managertower.tasks import build_task
from managertower.dist import free_port

REPO = Path(__file__).resolve().parents[3]
TOPK = 6  # fewer than the test split's 10 pictures: the merge of the two directions matters


def _task(shards: Path, run_dir: Path):
    cfg = load_config(str(REPO / "finetune/configs/tiny_flickr30k.yaml"),
                      [f"task.eval_shards=[{shards}/flickr30k/test-*.tar]", f"run.dir={run_dir}",
                       "train.micro_batch=8", f"task.retrieval_topk={TOPK}", "task.retrieval_rank=itm"])
    task = build_task(cfg)
    task.eval()
    return task


@torch.no_grad()
def _released_recalls(task) -> tuple[dict, list[list[int]]]:
    """Released objectives.py compute_irtr_itm_itc_recall, in one process and by brute force: ITC top-k both
    ways (lines 993-994, 1070-1071), the ITM positive logit `[:, 1]` of those pairs in two matrices filled with
    -100 (lines 1046-1059, 1242-1255), their element-wise max (1266-1267), recall@1/5 both ways (1269-1289).
    Returns (the recalls, each text's TOPK best picture indices)."""
    loader = task.build_loader("eval", 0, 1, torch.device("cpu"))
    pixels, captions = [], []
    for batch in loader:
        pixels.append(batch["pixel_values"])
        captions += batch["captions"]
    loader.close()
    model = task.model
    encoded = model.encode_image(torch.cat(pixels))
    image_emb = F.normalize(task.itc_head.image_proj(encoded[:, -1, 0]), dim=-1)
    image_layers = model.project_image(encoded)
    texts = [c for cs in captions for c in cs]
    text_to_image = [i for i, cs in enumerate(captions) for _ in cs]
    text_emb, text_layers, masks = task.encode_texts(texts, torch.device("cpu"), 64)
    n_texts, n_images = len(texts), len(captions)
    positive = torch.empty(n_texts, n_images)  # every pair's ITM positive logit
    for i in range(n_images):
        image = image_layers[i:i + 1].expand(n_texts, -1, -1, -1)
        positive[:, i] = task.itm_logits(text_layers, masks, image)[:, 1]
    sims = image_emb @ text_emb.t()  # images x texts
    img_scores = torch.full((n_images, n_texts), -100.0)
    txt_scores = torch.full((n_images, n_texts), -100.0)
    for i, top in enumerate(sims.topk(min(TOPK, n_texts), dim=1).indices):
        img_scores[i, top] = positive[top, i]
    for t, top in enumerate(sims.topk(min(TOPK, n_images), dim=0).indices.t()):
        txt_scores[top, t] = positive[t, top]
    scores = torch.maximum(img_scores, txt_scores)
    iids, tiids = torch.arange(n_images), torch.tensor(text_to_image)
    out = {}
    for k in (1, 5):  # recall@10 > TOPK would rank unscored (-100) pairs, in an arbitrary order
        out[f"tr_r{k}"] = float((iids[:, None] == tiids[scores.topk(k, dim=1).indices]).any(1).float().mean())
        out[f"ir_r{k}"] = float((tiids[None, :] == iids[scores.topk(k, dim=0).indices]).any(0).float().mean())
    return out, scores.t().topk(TOPK, dim=1).indices.tolist()


def _eval_worker(rank: int, world: int, port: int, shards: str, run_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        task = _task(Path(shards), Path(run_dir))
        with torch.no_grad():
            result = task.evaluate(rank, world, torch.device("cpu"))
        if rank == 0:
            Path(run_dir, "result.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def shards(synthetic_world) -> Path:
    return synthetic_world[1]


def test_released_ranking_in_evaluate_on_one_and_two_ranks(shards, tmp_path):
    """evaluate's recalls and written rankings are the released ones (see `_released_recalls`), on one rank and
    on two gloo ranks, where each pair's ITM logits come from the rank that holds its picture."""
    torch.manual_seed(0)
    task = _task(shards, tmp_path / "one")
    with torch.no_grad():
        one = task.evaluate(0, 1, torch.device("cpu"))
        released, ranked = _released_recalls(task)
    assert one["images"] > TOPK
    for key, value in released.items():
        assert one[key] == pytest.approx(value), key
    assert "itc_ir_r1" in one and "itc_tr_r1" in one
    written = json.loads((tmp_path / "one" / "predictions_flickr30k_test.json").read_text())
    image_ids = [entry["image_id"] for entry in written["image_to_text"]]
    assert [[image_ids.index(i) for i in entry["images"]] for entry in written["text_to_image"]] == ranked

    import torch.multiprocessing as mp

    two_dir = tmp_path / "two"
    mp.spawn(_eval_worker, args=(2, free_port(), str(shards), str(two_dir)), nprocs=2, join=True)
    two = json.loads((two_dir / "result.json").read_text())
    for key in [k for k in one if k.startswith(("ir_", "tr_", "itc_", "rsum"))]:
        assert two[key] == pytest.approx(one[key]), key
    # Two ranks list the pictures (and so the captions) in another order: compare by picture id and caption.
    assert _by_name(json.loads((two_dir / "predictions_flickr30k_test.json").read_text())) == _by_name(written)


def _by_name(predictions: dict) -> tuple[list, list]:
    texts = [entry["text"] for entry in predictions["text_to_image"]]
    return (sorted((entry["text"], entry["images"]) for entry in predictions["text_to_image"]),
            sorted((entry["image_id"], [texts[t] for t in entry["texts"]]) for entry in predictions["image_to_text"]))
