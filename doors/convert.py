"""Convert the authors' released ManagerTower / BridgeTower checkpoints, or a Hugging Face BridgeTower folder, into
a ManagerTower weights folder that fine-tuning (`--from DIR`) and pre-training (`checkpoint.init_from=DIR`) start
from. docs/weights.md has the mapping of every key.

    python -m doors.convert ManagerTower_pt_base.ckpt --out weights/mt-base --tokenizer-dir models/roberta-base
    python -m doors.convert ManagerTower_ft_vqa.ckpt --out weights/mt-vqa --tokenizer-dir models/roberta-base \\
        --vqa-labels released_label2ans.json --answer-vocab shards/vqav2/answer_vocab.json
    python -m doors.convert hf/bridgetower-base-itm-mlm --out weights/bt --tokenizer-dir hf/bridgetower-base-itm-mlm

--format (released-mt, released-bt, hf-bridgetower) is detected from the keys when not given. The tokenizer
folder is local (nothing is downloaded); its config.json, where it has one, states the text expert's heads and
LayerNorm eps. The command prints the recipe overrides that build the converted model.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from doors.recipe import USER_ERRORS, user_error
from managertower.console import silence_known_warnings


def main(argv: list[str] | None = None) -> int:
    from managertower.convert import SOURCE_FORMATS

    parser = argparse.ArgumentParser(prog="python -m doors.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a released .ckpt / .pt / .safetensors file, or a transformers folder")
    parser.add_argument("--out", required=True, help="the weights folder to write")
    parser.add_argument("--format", choices=SOURCE_FORMATS, default=None, help="default: detected from the keys")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="local folder of the text expert's tokenizer (and config.json), copied into --out")
    parser.add_argument("--vqa-labels", default=None,
                        help="VQAv2 checkpoints: the released answer list in label order (JSON list, or answer -> "
                             "label)")
    parser.add_argument("--answer-vocab", default=None,
                        help="VQAv2: our answer vocabulary (answer_vocab.json); rows are mapped by answer string "
                             "(default: keep the released order and write it as OUT/answer_vocab.json)")
    args = parser.parse_args(argv)
    silence_known_warnings()
    from managertower.convert import convert_checkpoint

    try:
        done = convert_checkpoint(args.source, args.out, args.format, tokenizer_dir=args.tokenizer_dir,
                                  vqa_labels=args.vqa_labels, answer_vocab=args.answer_vocab)
    except USER_ERRORS as error:
        return user_error(error)
    print(f"converted {args.source} ({done.format}) -> {done.out}: {len(done.mapped)} keys mapped, "
          f"{len(done.dropped)} dropped (the reasons are in {done.out}/conversion.json)")
    for note in done.notes:
        print(f"note: {note}")
    print("fine-tune from it with these overrides (they build the converted model):")
    weights = done.out / "model.safetensors"
    print(f"  --from {shlex.quote(str(weights))} " + " ".join(shlex.quote(o) for o in done.finetune_overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
