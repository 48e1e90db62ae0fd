"""The image-text loaders for real: DALI (CPU) and webdataset + PIL over shards written by ShardWriter."""
import io
import os
import shutil
import zlib
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from managertower.config import ConfigError, load_config
from managertower.data.collate import PretrainCollator, expand_pretrain
from managertower.data.loader import LoaderSpec, TooManyBadSamples, build_loader
from managertower.data.shards import ShardError, ShardWriter, expand_shards
from managertower.model.experts import load_tokenizer
from managertower.config import ModelConfig

SIZE = 48


def _jpeg(seed, width=80, height=60):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] * np.ones((height, 1, 3)) + rng.integers(0, 50, 3)
    array = np.clip(ramp + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write(folder, prefix, count, per_shard=10, captions=lambda i: 1 + i % 3, corrupt=(), second_image=False):
    with ShardWriter(folder, "train", samples_per_shard=per_shard) as writer:
        for i in range(count):
            key = f"{prefix}{i:04d}"
            image = _jpeg(zlib.crc32(key.encode()), 80 + 8 * (i % 3), 60 + 4 * (i % 2))
            if i in corrupt:
                image = corrupt[i]
            meta = {"key": key, "source": prefix, "split": "train", "image_id": key, "width": 80, "height": 60,
                    "captions": [f"{prefix} picture {i} caption {c}" for c in range(captions(i))]}
            extra = {"img1.jpg": _jpeg(i + 999)} if second_image else None
            writer.write(key, image, meta, extra)
    return sorted(str(p) for p in expand_shards(str(folder)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    good = _jpeg(1)
    return {
        "a": _write(root / "a", "a", 37),
        "b": _write(root / "b", "b", 23, per_shard=8),
        # one garbage member (fails the header parse) and one truncated JPEG (fails inside DALI's decoder)
        "bad": _write(root / "bad", "x", 30, corrupt={4: b"this is not a jpeg" * 20, 17: good[: len(good) // 3]}),
        "pair": _write(root / "pair", "p", 12, second_image=True),
        "root": root,
    }


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(size="tiny"))


def _keys(examples, images):
    return {"keys": [e["key"] for e in examples], "texts": [e["text"] for e in examples]}


def _loader(shards, backend, **kwargs):
    options = dict(backend=backend, batch_size=8, image_size=SIZE, rank=0, world_size=1, seed=11,
                   expand=partial(expand_pretrain, per_caption=True), collate=_keys, train=False,
                   num_threads=2, shuffle_buffer=16, device="cpu")
    options.update(kwargs)
    return build_loader(LoaderSpec(shards, **options))


def test_dali_and_webdataset_give_the_same_batches(data, tokenizer):
    batches = {}
    for backend in ("dali", "webdataset"):
        collator = PretrainCollator(tokenizer, 16, seed=4)
        batches[backend] = list(_loader([data["a"]], backend, collate=collator))
    dali, wds = batches["dali"], batches["webdataset"]
    captions = sum(1 + i % 3 for i in range(37))
    assert len(dali) == len(wds) == -(-captions // 8)  # last partial batch kept
    assert dali[-1]["pixel_values"].shape[0] == captions % 8
    for a, b in zip(dali, wds):
        assert a["pixel_values"].dtype == torch.float32 and a["pixel_values"].shape[1:] == (3, SIZE, SIZE)
        for key in ("input_ids", "mlm_input_ids", "mlm_labels", "itm_image_index", "itm_labels"):
            assert torch.equal(a[key], b[key]), key
        difference = (a["pixel_values"] - b["pixel_values"]).abs().mean().item()
        assert difference < 0.05, difference
    # CLIP normalisation: the pixels are not in [0, 1]
    assert dali[0]["pixel_values"].min() < -0.5 and dali[0]["pixel_values"].max() > 1.0


@pytest.mark.parametrize("backend", ["dali", "webdataset"])
def test_two_ranks_cover_every_sample_once(data, backend):
    seen = []
    for rank in range(2):
        loader = _loader([data["a"]], backend, rank=rank, world_size=2, batch_size=5, num_threads=1,
                         expand=partial(expand_pretrain, per_caption=False))
        seen.append([k for batch in loader for k in batch["keys"]])
    assert len(seen[0]) == 18 and len(seen[1]) == 19  # DALI's split: floor(37 r / 2)
    assert sorted(seen[0] + seen[1]) == [f"a{i:04d}" for i in range(37)]


def _equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("backend, pool", [("dali", 1), ("webdataset", 1), ("dali", 6), ("webdataset", 6)])
def test_exact_resume(data, tokenizer, backend, pool):
    def make():
        return _loader([data["a"], data["b"]], backend, weights=[2.0, 1.0], train=True, seed=3, batch_size=7,
                       collate=PretrainCollator(tokenizer, 16, seed=3), example_pool=pool)

    reference = make()
    it = iter(reference)
    uninterrupted = [next(it) for _ in range(26)]  # past an epoch of dataset b
    assert reference.epochs[1] >= 1

    first = make()
    it = iter(first)
    for done in range(1, 20):  # stop where examples are left over in the buffer (the harder case)
        next(it)
        if done >= 7 and first.state_dict()["buffer"]:
            break
    assert first.state_dict()["buffer"]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.close()
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    # DALI keeps the encoded bytes of the samples still in the buffer (decoded again on restore), not pixels
    assert all(("encoded" in raw) == (backend == "dali") for raw in state["raws"])

    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.samples_seen == 7 * done and resumed.batches == done
    it = iter(resumed)
    for expected in uninterrupted[done:]:
        _equal(expected, next(it))
    assert resumed.samples_seen == reference.samples_seen


@pytest.mark.parametrize("pool", [1, 8])
def test_exact_resume_finetune_augmentation(data, pool):
    def make():
        return _loader([data["a"]], "dali", train=True, transform="albef_randaug", batch_size=6, prefetch=0,
                       example_pool=pool)

    uninterrupted = [b for _, b in zip(range(5), make())]
    first = make()
    for _ in zip(range(2), first):
        pass
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for expected in uninterrupted[2:]:
        _equal(expected, next(iter(resumed)))
    # augmented crops differ from the plain resize + centre crop
    plain = next(iter(_loader([data["a"]], "dali", train=True, batch_size=6, example_pool=pool)))
    assert plain["keys"] == uninterrupted[0]["keys"]
    assert (plain["pixel_values"] - uninterrupted[0]["pixel_values"]).abs().mean() > 0.05


@pytest.mark.parametrize("backend", ["dali", "webdataset"])
def test_example_pool_mixes_images_into_batches_without_repeats(data, backend):
    """One image's captions fill a batch together without the pool; with it, a batch draws from many images, and
    in the first pass over the data no example comes twice and none is lost."""
    def batches(pool, count):
        loader = _loader([data["a"]], backend, train=True, batch_size=6, example_pool=pool, shuffle_buffer=4)
        out = [b for _, b in zip(range(count), loader)]
        loader.close()
        return out

    def images_per_batch(out):
        return sum(len(set(b["keys"])) for b in out) / len(out)

    captions = sum(1 + i % 3 for i in range(37))  # 73 examples of 37 images
    plain, mixed = batches(1, 8), batches(16, 8)
    assert images_per_batch(mixed) > images_per_batch(plain) + 1, (images_per_batch(plain), images_per_batch(mixed))
    seen = [(k, t) for b in mixed for k, t in zip(b["keys"], b["texts"])]
    assert len(seen) == 48 and len(set(seen)) == 48  # 48 of 73: still in the first epoch
    # over a whole epoch and a bit, every example of the first epoch comes out
    everything = [(k, t) for b in batches(16, -(-captions // 6) + 8) for k, t in zip(b["keys"], b["texts"])]
    assert len(set(everything)) == captions


def test_finetune_augmentation_agrees_across_backends(data):
    kwargs = dict(transform="albef_randaug", hflip=True, batch_size=6, expand=partial(expand_pretrain, per_caption=False))
    dali = next(iter(_loader([data["a"]], "dali", **kwargs)))
    wds = next(iter(_loader([data["a"]], "webdataset", num_threads=0, **kwargs)))
    assert dali["keys"] == wds["keys"]
    # same crop boxes, flips and RandAugment ops; only the decoders and resamplers differ
    assert (dali["pixel_values"] - wds["pixel_values"]).abs().mean() < 0.05


@pytest.mark.parametrize("backend", ["dali", "webdataset"])
def test_mixing_weights(data, backend):
    loader = _loader([data["a"], data["b"]], backend, weights=[3.0, 1.0], train=True, batch_size=16,
                     expand=partial(expand_pretrain, per_caption=False), num_threads=1)
    keys = [k for _, batch in zip(range(30), loader) for k in batch["keys"]]
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(share - 0.75) < 0.06, share  # 480 draws: sd 0.02


@pytest.mark.parametrize("backend", ["dali", "webdataset"])
def test_corrupt_samples_are_skipped_and_counted(data, backend, caplog):
    loader = _loader([data["bad"]], backend, max_bad_fraction=0.5, bad_fraction_floor=10,
                     expand=partial(expand_pretrain, per_caption=False))
    keys = [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == [f"x{i:04d}" for i in range(30) if i not in (4, 17)]
    assert loader.bad_samples == 2 and loader.images_seen == 28
    assert "x0004" in caplog.text and "x0017" in caplog.text

    strict = _loader([data["bad"]], backend, max_bad_fraction=0.01, bad_fraction_floor=10,
                     expand=partial(expand_pretrain, per_caption=False))
    with pytest.raises(TooManyBadSamples, match="max_bad_fraction"):
        list(strict)


def test_two_images_per_sample(data):
    loader = _loader([data["pair"]], "dali", images=("jpg", "img1.jpg"), batch_size=4,
                     expand=partial(expand_pretrain, per_caption=False))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == batch["pixel_values_2"].shape == (4, 3, SIZE, SIZE)
    assert not torch.equal(batch["pixel_values"], batch["pixel_values_2"])


def test_bad_configs_fail_early(data, tmp_path):
    with pytest.raises(ShardError, match="dataprep"):
        _loader([[str(tmp_path / "nope-000000.tar")]], "dali")
    copy = tmp_path / "train-000000.tar"
    shutil.copy(data["a"][0], copy)
    with pytest.raises(ShardError, match="wds2idx") as error:
        _loader([[str(copy)]], "webdataset")
    assert "dataprep" in str(error.value) and os.path.basename(str(copy)[:-4] + ".idx") in str(error.value)
    for kwargs, match in (({"image_size": 0}, "image_size"), ({"backend": "torch"}, "backend"),
                          ({"rank": 2, "world_size": 2}, "rank"), ({"weights": [1.0, 2.0]}, "weights"),
                          ({"transform": "heavy"}, "transform"), ({"batch_size": -1}, "batch_size")):
        with pytest.raises(ConfigError, match=match):
            _loader([data["a"]], kwargs.pop("backend", "dali"), **kwargs)


def test_pretrain_task_builds_its_loaders(data, tmp_path):
    """The pre-training task declares its data; Task.build_loader turns it into the one LoaderSpec."""
    from managertower.tasks.pretrain import PretrainTask

    cfg = load_config(None, [f"data.train_shards=[{data['root'] / 'a'},{data['root'] / 'b'}]", "data.weights=[1,1]",
                             "data.backend=dali", "data.num_threads=1", "data.shuffle_buffer=8",
                             f"model.image_size={SIZE}", "model.max_text_len=20", "train.micro_batch=6",
                             "train.global_batch=6", f"run.dir={tmp_path}"])
    task = PretrainTask(cfg)
    loader = task.build_loader("train", 0, 1, "cpu")
    assert loader.spec.weights == [1.0, 1.0] and len(loader.spec.shards) == 2
    batch = next(iter(loader))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels",
                          "mlm_positions", "mlm_targets", "itm_image_index", "itm_labels", "image_ids"}
    picked = batch["mlm_labels"] != -100
    assert torch.equal(batch["mlm_targets"], batch["mlm_labels"][picked])
    assert torch.equal(batch["mlm_input_ids"].flatten()[batch["mlm_positions"]], batch["mlm_input_ids"][picked])
    assert batch["pixel_values"].shape == (6, 3, SIZE, SIZE) and batch["input_ids"].shape == (6, 20)
    assert batch["itm_labels"].sum() == 3
    loader.close()
    with pytest.raises(ShardError, match="data.val_shards"):
        task.build_loader("eval", 0, 1, "cpu")


@pytest.mark.parametrize("transform", ["clip", "albef_randaug"])
def test_worker_threads_do_not_change_the_batches(data, transform):
    """Resizing and per-example augmentation run in `num_threads` worker threads: every image's pixels are a
    function of the image and its seed alone, so one thread and three give the same batches bit for bit."""
    def batches(threads):
        loader = _loader([data["a"]], "dali", train=True, transform=transform, batch_size=6, example_pool=8,
                         num_threads=threads)
        out = [b for _, b in zip(range(4), loader)]
        loader.close()
        return out

    for one, three in zip(batches(1), batches(3)):
        _equal(one, three)
