"""Fine-tuning pieces on the CPU: hard negatives, the ITC gather across two gloo ranks, collators, heads,
weights from a pre-trained checkpoint, the epoch schedule, the CLI and the batch runner's job expansion."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from managertower.config import ConfigError, load_config
from managertower.tasks import build_task
from managertower.tasks.losses import itc_loss, sample_hard_negatives

TINY = {t: str(REPO / f"finetune/configs/tiny_{t}.yaml") for t in ("vqav2", "nlvr2", "snli_ve", "flickr30k", "coco")}
EVAL_SPLIT = {"vqav2": "val", "nlvr2": "dev", "snli_ve": "dev", "flickr30k": "test", "coco": "test"}


def tiny_config(task: str, shards: Path, run_dir: Path, *overrides: str):
    return load_config(TINY[task], [f"task.train_shards=[{shards}/{task}/train-*.tar]",
                                    f"task.eval_shards=[{shards}/{task}/{EVAL_SPLIT[task]}-*.tar]",
                                    f"run.dir={run_dir}", *overrides])


# ------------------------------------------------------------------------------------------ hard negatives


def test_hard_negatives_never_pick_a_positive_even_a_same_image_caption():
    generator = torch.Generator().manual_seed(0)
    # 8 captions of 4 pictures (two captions each, side by side as the loader makes them)
    ids = torch.tensor([5, 5, 9, 9, 2, 2, 7, 7])
    for trial in range(50):
        sim = torch.randn(8, 8, generator=generator) * 10
        sim[ids[:, None] == ids[None, :]] += 30  # positives far more similar: the softmax is nearly all theirs
        picked, valid = sample_hard_negatives(sim, ids, ids, generator)
        assert valid.all()
        assert (ids[picked] != ids).all(), (trial, picked)
    # texts against distinct pictures (B x U), with an underflowing softmax on the negatives
    pictures = torch.tensor([5, 9, 2, 7])
    sim = torch.full((8, 4), -1e4)
    sim[ids[:, None] == pictures[None, :]] = 1e4
    picked, valid = sample_hard_negatives(sim, ids, pictures, generator)
    assert valid.all() and (pictures[picked] != ids).all()


def test_hard_negatives_follow_the_similarity_and_skip_rows_without_negatives():
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([1, 2, 3, 1])
    sim = torch.tensor([[0.0, 9.0, -9.0, 0.0]] * 4)
    counts = torch.zeros(4)
    for _ in range(200):
        picked, _ = sample_hard_negatives(sim[:1], ids[:1], ids, generator)
        counts[picked] += 1
    assert counts[1] > 190 and counts[0] == counts[3] == 0  # the hardest negative; never a positive
    picked, valid = sample_hard_negatives(torch.zeros(2, 2), torch.tensor([4, 4]), torch.tensor([4, 4]), generator)
    assert not valid.any()  # every column is a positive: no negative for these rows


# -------------------------------------------------------------------------------- ITC across two ranks


def _features(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    text = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    image = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    text_ids = torch.tensor([10 * rank, 10 * rank, 10 * rank + 1])  # two captions of one picture
    image_ids = torch.tensor([10 * rank, 10 * rank + 1])
    return text, image, text_ids, image_ids


def _gather_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for rank0_weight in (1.0, 0.0):  # both losses; only rank 1's loss
            text, image, text_ids, image_ids = _features(rank)
            text.requires_grad_(True)
            image.requires_grad_(True)
            loss, t2i, i2t, all_ids = itc_loss(text, image, text_ids, image_ids, torch.tensor(0.07))
            (loss * (rank0_weight if rank == 0 else 1.0)).backward()
            torch.save({"loss": loss.detach(), "t2i": t2i.detach(), "i2t": i2t.detach(), "ids": all_ids,
                        "text_grad": text.grad, "image_grad": image.grad},
                       os.path.join(out_dir, f"rank{rank}-w{rank0_weight:g}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> dict:
    """Two gloo ranks (torch.multiprocessing) run itc_loss; {rank0 weight: [rank 0 result, rank 1 result]}."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("itc")
    mp.spawn(_gather_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return {w: [torch.load(out / f"rank{r}-w{w:g}.pt") for r in range(2)] for w in (1.0, 0.0)}


def _reference(rank0_weight: float):
    """One process, both ranks' features: the same losses and the gradients of their (weighted) sum."""
    feats = [_features(r) for r in range(2)]
    texts = [f[0].clone().requires_grad_(True) for f in feats]
    images = [f[1].clone().requires_grad_(True) for f in feats]
    all_text, all_image = torch.cat(texts), torch.cat(images)
    all_text_ids = torch.cat([f[2] for f in feats])
    all_image_ids = torch.cat([f[3] for f in feats])
    losses, logits = [], []
    for r in range(2):
        t2i = texts[r] @ all_image.t() / 0.07
        i2t = images[r] @ all_text.t() / 0.07

        def soft_ce(lg, rows, cols):
            pos = (rows[:, None] == cols[None, :]).float()
            return -(pos / pos.sum(1, keepdim=True) * F.log_softmax(lg, 1)).sum(1).mean()

        losses.append((soft_ce(t2i, feats[r][2], all_image_ids) + soft_ce(i2t, feats[r][3], all_text_ids)) / 2)
        logits.append((t2i.detach(), i2t.detach()))
    (rank0_weight * losses[0] + losses[1]).backward()
    return losses, logits, texts, images


def test_itc_gathers_across_two_ranks_with_gradients(gathered):
    results = gathered[1.0]
    losses, logits, texts, images = _reference(1.0)
    for r in range(2):
        assert results[r]["t2i"].shape == (3, 4) and results[r]["i2t"].shape == (2, 6)  # local x all ranks
        torch.testing.assert_close(results[r]["t2i"], logits[r][0])
        torch.testing.assert_close(results[r]["i2t"], logits[r][1])
        torch.testing.assert_close(results[r]["loss"], losses[r].detach())
        assert results[r]["ids"].tolist() == [0, 1, 10, 11]
        # each rank's features get the gradient of BOTH ranks' losses
        torch.testing.assert_close(results[r]["text_grad"], texts[r].grad)
        torch.testing.assert_close(results[r]["image_grad"], images[r].grad)


def test_gradients_reach_the_other_ranks_features(gathered):
    results = gathered[0.0]  # only rank 1's loss counts
    _, _, texts, images = _reference(0.0)
    assert results[0]["text_grad"].abs().sum() > 0 and results[0]["image_grad"].abs().sum() > 0
    torch.testing.assert_close(results[0]["text_grad"], texts[0].grad)
    torch.testing.assert_close(results[0]["image_grad"], images[0].grad)


# ------------------------------------------------------------------------------------- tasks on the data


@pytest.fixture(scope="module")
def world(synthetic_world):
    return synthetic_world[1]


@pytest.mark.parametrize("name", ["vqav2", "nlvr2", "snli_ve", "flickr30k"])
def test_each_task_trains_a_step_and_evaluates_to_a_prediction_file(name, world, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(name, world, tmp_path, "train.micro_batch=8", "train.global_batch=8",
                      "task.retrieval_topk=4")
    task = build_task(cfg)
    loader = task.build_loader("train", 0, 1, torch.device("cpu"))
    batch = next(iter(loader))
    loader.close()
    assert batch["pixel_values"].shape == (8, 3, 64, 64)
    out = task(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["batch_size"] == 8
    new = [n for n, p in task.named_parameters() if p.grad is not None and not n.startswith("model.")]
    assert new, "the task's heads get gradients"
    task.eval()
    with torch.no_grad():
        result = task.evaluate(0, 1, torch.device("cpu"))
    written = sorted(p.name for p in tmp_path.glob("predictions_*"))
    assert written == [f"predictions_{name}_{EVAL_SPLIT[name]}.{'csv' if name in ('nlvr2', 'snli_ve') else 'json'}"]
    path = tmp_path / written[0]
    if name == "vqav2":
        rows = json.loads(path.read_text())
        assert set(rows[0]) == {"question_id", "answer"} and len(rows) == int(result["questions"])
        assert 0 <= result["vqa_score"] <= 1 and result["vqa_score_majority"] > 0
    elif name == "nlvr2":
        lines = path.read_text().splitlines()
        assert len(lines) == int(result["examples"])
        identifier, prediction = lines[0].split(",")
        assert identifier.startswith("dev-") and prediction in ("True", "False")
    elif name == "snli_ve":
        lines = path.read_text().splitlines()
        assert lines[0] == "pair_id,prediction,label" and lines[1].split(",")[1] in ("contradiction", "neutral", "entailment")
    else:
        for key in ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "itc_ir_r1"):
            assert 0 <= result[key] <= 1
        assert result["ir_r10"] >= result["ir_r1"]


def test_vqa_targets_are_the_soft_scores_of_in_vocabulary_answers(world, tmp_path):
    task = build_task(tiny_config("vqav2", world, tmp_path))
    meta = {"questions": [{"question_id": 7, "question": "what color?", "answers": {"red": 1.0, "rot": 0.3}},
                          {"question_id": 8, "question": "how many?", "answers": {"2": 0.6, "3": 0.9}}]}
    examples = task.expand(meta)
    assert [e["question_id"] for e in examples] == [7, 8]  # one example per question
    batch = task.make_collator(train=True)(examples)
    index = task.answer_index
    assert batch["targets"][0, index["red"]] == 1.0 and batch["targets"][0].sum() == 1.0  # "rot": not a class
    assert batch["targets"][1, index["2"]] == pytest.approx(0.6) and batch["targets"][1, index["3"]] == pytest.approx(0.9)
    assert task.classifier.fc1.in_features == 2 * 64 and task.classifier.fc1.out_features == 4 * 64
    assert task.classifier.fc2.out_features == len(json.loads((world / "vqav2" / "answer_vocab.json").read_text()))


def test_heads_shapes_and_lr_multipliers(world, tmp_path):
    shapes = {"nlvr2": (4 * 64, 2 * 64, 2), "snli_ve": (2 * 64, 4 * 64, 3)}
    for name, (fan_in, hidden, classes) in shapes.items():
        task = build_task(tiny_config(name, world, tmp_path, "task.head_lr_mult=0"))
        assert (task.classifier.fc1.in_features, task.classifier.fc1.out_features,
                task.classifier.fc2.out_features) == (fan_in, hidden, classes)
        assert task.lr_multiplier("classifier.fc1.weight") == 10.0
        assert task.lr_multiplier("model.text_expert.encoder.embeddings.word_embeddings.weight") == 1.0
        assert task.lr_multiplier("model.text_layers.0.attention.q.weight") == 5.0
    vqa = build_task(tiny_config("vqav2", world, tmp_path, "task.head_lr_mult=0"))
    assert vqa.lr_multiplier("classifier.fc2.bias") == 50.0
    retrieval = build_task(tiny_config("flickr30k", world, tmp_path, "task.head_lr_mult=0"))
    assert retrieval.lr_multiplier("itc_head.text_proj.weight") == 5.0 == retrieval.lr_multiplier("itm_head.fc.weight")
    assert retrieval.itc_head.temperature().item() == pytest.approx(0.07)
    with torch.no_grad():
        retrieval.itc_head.log_temperature.fill_(5.0)
    assert retrieval.itc_head.temperature().item() == pytest.approx(0.5)


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


def test_epochs_set_the_steps_from_the_number_of_examples(world, tmp_path):
    cfg = tiny_config("snli_ve", world, tmp_path, "task.epochs=2", "train.global_batch=32")
    recipe_steps = cfg.train.steps
    task = build_task(cfg)
    examples = task.train_examples()
    hypotheses = 0
    import tarfile

    for tar_path in sorted((world / "snli_ve").glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    hypotheses += len(json.load(tar.extractfile(member))["hypotheses"])
    assert examples == hypotheses > 0
    assert task.total_steps() == -(-2 * examples // 32)
    assert cfg.train.steps == recipe_steps  # decided in total_steps() alone: the config is not rewritten


# ------------------------------------------------------------------------------------------------- doors


def test_cli_config_errors_and_defaults(tmp_path, capsys):
    from finetune.__main__ import build_config, main

    local = ["model.text_expert=null"]  # the recipes name /path/to/roberta-base: a placeholder for the user's
    cfg = build_config("vqav2", None, None, local)
    assert cfg.task.name == "vqav2" and cfg.model.image_size == 576 and cfg.train.lr == 9e-6
    assert cfg.task.head_lr_mult == 50 and cfg.train.weight_decay == 0.06 and cfg.train.global_batch == 576
    for task, (res, epochs, batch, lr, head) in {"snli_ve": (384, 4, 64, 3e-6, 10), "nlvr2": (384, 5, 256, 1.4e-5, 10),
                                                  "flickr30k": (384, 20, 512, 6e-6, 5)}.items():
        cfg = build_config(task, None, None, local)
        assert (cfg.model.image_size, cfg.task.epochs, cfg.train.global_batch, cfg.train.lr,
                cfg.task.head_lr_mult) == (res, epochs, batch, lr, head)
    assert build_config("flickr30k", None, None, local).model.max_text_len == 40
    assert build_config("coco", None, None, local).task.retrieval_topk == 256
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("nlvr2", TINY["nlvr2"], str(tmp_path / "nope.pt"), [])
    with pytest.raises(ConfigError, match="task.name"):
        build_config("nlvr2", TINY["vqav2"], None, ["task.name=vqav2"])
    assert main(["--task", "nlvr2", "--config", TINY["nlvr2"], "--print-config", "--local_rank=0"]) == 0
    assert "name: nlvr2" in capsys.readouterr().out
    assert main(["--task", "nlvr2", "--config", TINY["nlvr2"], "train.lr=oops"]) == 2


def test_batch_expands_tasks_seeds_and_learning_rates(tmp_path, capsys):
    from finetune import batch

    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(f"""
vars: {{shards: /data/shards, init_from: none}}
out: {tmp_path}/out
init_from: ${{init_from}}
num_gpus: 2
seeds: [0, 1]
overrides: [run.progress=false]
jobs:
  - task: nlvr2
    config: {TINY['nlvr2']}
    lr: [1.0e-4, 2.0e-4]
    overrides: ["task.train_shards=[${{shards}}/nlvr2/train-*.tar]"]
  - task: vqav2
    config: {TINY['vqav2']}
    seeds: [3]
    num_gpus: 1
""")
    jobs, out = batch.load_jobs(str(jobs_file), variables={"init_from": "/ckpt.pt"})
    assert out == tmp_path / "out"
    assert [j.name for j in jobs] == ["nlvr2-seed0-lr0.0001", "nlvr2-seed0-lr0.0002", "nlvr2-seed1-lr0.0001",
                                      "nlvr2-seed1-lr0.0002", "vqav2-seed3"]
    first = jobs[0]
    assert first.init_from == "/ckpt.pt" and first.num_gpus == 2 and jobs[-1].num_gpus == 1
    args = first.arguments()
    assert args[:6] == ["--task", "nlvr2", "--config", TINY["nlvr2"], "--from", "/ckpt.pt"]
    assert f"run.dir={tmp_path}/out/nlvr2-seed0-lr0.0001" in args and "train.lr=0.0001" in args
    assert "task.train_shards=[/data/shards/nlvr2/train-*.tar]" in args and "run.progress=false" in args
    command = batch.job_command(first)
    assert command[1:5] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2"] and "--module" in command
    assert batch.job_command(jobs[-1])[1:3] == ["-m", "finetune"]
    assert batch.main([str(jobs_file), "--count"]) == 0 and capsys.readouterr().out.strip() == "5"
    assert batch.main([str(jobs_file), "--dry-run", "--array-index", "4"]) == 0
    assert "vqav2-seed3" in capsys.readouterr().out
    assert batch.main([str(jobs_file), "--array-index", "9"]) == 2
    assert batch.main([str(jobs_file), "shards"]) == 2
    # a finished job is recognised; the results table is built from the summaries
    run_dir = jobs[-1].run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"steps": 5, "total_steps": 5, "wall_s": 12.0,
                                                      "vqa_score": 0.4321, "preempted": False}))
    (run_dir / "config.yaml").write_text("task: {eval_split: val}\ntrain: {lr: 0.0002}\n")
    assert batch.is_complete(run_dir) and not batch.is_complete(jobs[0].run_dir)
    rows = batch.write_results(jobs, out)
    assert rows == [{"task": "vqav2", "split": "val", "metric": "vqa_score", "value": 0.4321, "checkpoint": "/ckpt.pt",
                     "seed": 3, "lr": 0.0002, "wall_s": 12.0, "steps": 5, "job": "vqav2-seed3", "run_dir": str(run_dir)}]
    assert json.loads((out / "results.json").read_text())[0]["metric"] == "vqa_score"
    table = (out / "results.md").read_text()
    assert "| vqav2 | val | vqa_score | 43.21 |" in table and "12 s" in table


def test_batch_reports_bad_jobs_files(tmp_path, capsys):
    from finetune import batch

    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [{task: nlvr2, config: x.yaml, colour: red}]\n")
    assert batch.main([str(bad), "--count"]) == 2
    assert "unknown keys" in capsys.readouterr().err
    undefined = tmp_path / "undefined.yaml"
    undefined.write_text("init_from: ${nowhere}\njobs: [{task: nlvr2}]\n")
    assert batch.main([str(undefined), "--count"]) == 2
    assert "${nowhere}" in capsys.readouterr().err
    assert batch.main([str(tmp_path / "missing.yaml")]) == 2
