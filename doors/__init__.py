"""What the doors share, and the small doors that have no package of their own.

The layering is library <- doors: `managertower` builds, checks and runs things and never reads a command line;
each door (`pretrain`, `finetune`, `dataprep`, `demo`, `cluster`) parses its arguments and calls the library.
Argument parsing that more than one door needs lives here, not in one door that the others import:

    doors.recipe     the recipe options (--print-config, --print-keys, key=value overrides) and one-line errors
    doors.inspect    `mt-inspect` / `python -m doors.inspect`: parameters and multiply-adds per manager kind
"""
