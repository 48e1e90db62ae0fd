"""The data path, one module per concept, in the order a sample travels:

    formats/<source>.py   raw annotations of one dataset -> items (image + metadata)      [dataprep]
    images.py             one image -> a clean baseline RGB JPEG (or a rejection)           [dataprep]
    prep.py               items -> shards in parallel, resumable, with a manifest           [dataprep]
    shards.py             the shard format: tar + DALI index, schema, globs, metadata reads (its one owner)
    plan.py               this rank's part of each dataset; the sample record and its saved state
    dali.py, wds.py       the two reader/decoder backends (DALI; webdataset + PIL)
    augment.py            image geometry (resize/crop, RandomResizedCrop, flip) and RandAugment
    workers.py            threads for the per-image work on the CPU (resize, per-example augmentation)
    loader.py             LoaderSpec -> Loader: mixing, expansion into examples, batching, exact resume
    collate.py            pre-training examples and batches (captions, MLM masking, ITM pairs)
    synthetic.py          the demo's and the tests' synthetic world (raw files in the real formats)

A task declares its data (tasks/base.py: shards, `expand`, collator, images, augmentation); `Task.build_loader`
turns that and the config into one `LoaderSpec` and is the only caller of `loader.build_loader`.
"""
