"""The fine-tuning door: `python -m finetune --task T ...` and the batch runner `python -m finetune.batch`."""
