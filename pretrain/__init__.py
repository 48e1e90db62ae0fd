"""The pre-training door: `python -m pretrain --config C [key=value ...]` (see __main__.py)."""
