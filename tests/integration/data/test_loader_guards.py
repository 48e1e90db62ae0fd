"""The loader stops with a clear error instead of spinning: shards that hold nothing the task reads."""
import io

import numpy as np
import pytest
from PIL import Image

from managertower.data.collate import expand_pretrain
from managertower.data.loader import LoaderSpec, NoExamples, build_loader
from managertower.data.shards import ShardWriter, expand_shards


def _write_questions_only(folder, count=12):
    """VQAv2-like samples: questions, no captions (pre-training expands them into nothing)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(buffer, "JPEG")
    with ShardWriter(folder, "train", samples_per_shard=5) as writer:
        for i in range(count):
            meta = {"key": f"q{i:03d}", "source": "vqav2", "split": "train", "image_id": i, "width": 40,
                    "height": 40, "captions": [], "questions": [{"question_id": i, "question": "what?"}]}
            writer.write(f"q{i:03d}", buffer.getvalue(), meta)
    return expand_shards(str(folder))


@pytest.mark.timeout(120)  # the error comes within a second; the bug it guards against spun for ever
@pytest.mark.parametrize("backend", ["dali", "webdataset"])
@pytest.mark.parametrize("train", [True, False])
def test_shards_without_examples_are_a_clear_error_not_a_hang(tmp_path, backend, train):
    shards = _write_questions_only(tmp_path / "vqa")
    loader = build_loader(LoaderSpec([shards], expand=expand_pretrain, collate=lambda e, i: {}, batch_size=4,
                                     image_size=32, backend=backend, train=train, num_threads=1,
                                     shuffle_buffer=4, device="cpu"))
    try:
        with pytest.raises(NoExamples, match=r"train-000000.tar and 2 more shards\) gave no example in its first 12 samples"):
            next(iter(loader))
    finally:
        loader.close()
