"""DeepSpeed engine knobs, one JSON file per ZeRO layout (see README.md in this folder).

A package so that the files install with the library (package data) and are found through
`importlib.resources.files("ds_configs")` wherever it is installed. `managertower.config.DS_LAYOUTS` says which
file each (train.zero_stage, train.offload) takes; `managertower.engine.deepspeed_config.build_ds_config` adds
the precision section and batch sizes from the recipe.
"""
