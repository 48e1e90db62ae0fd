"""dataprep on hostile input: 16-bit images in bounded memory with the same pixels as before, values that
make no sense refused before anything starts, and malformed annotations as one line naming file and line."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import managertower.data.images as images
from dataprep.__main__ import main
from managertower.data.formats import DataprepError
from managertower.data.images import sanitize_image
from managertower.data.prep import PrepSettings, prepare
from managertower.data.shards import expand_shards, iter_metadata

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_door(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def write_coco(root, count: int = 3) -> str:
    os.makedirs(os.path.join(root, "train2014"), exist_ok=True)
    records = []
    for index in range(count):
        filename = f"COCO_train2014_{index:012d}.jpg"
        Image.new("RGB", (40, 30), (200, 30, 30)).save(os.path.join(root, "train2014", filename))
        records.append({"filepath": "train2014", "filename": filename, "cocoid": index, "split": "train",
                        "sentences": [{"raw": f"a red picture {index}"}]})
    with open(os.path.join(root, "dataset_coco.json"), "w") as handle:
        json.dump({"images": records}, handle)
    return str(root)


# -- 4. 16-bit images: bounded memory, the same pixels -------------------------------------------------

def gray16_png(width: int, height: int) -> bytes:
    ramp = (np.arange(width, dtype=np.uint32) * 65535 // max(1, width - 1)).astype("<u2")
    pixels = np.ascontiguousarray(np.broadcast_to(ramp, (height, width)))
    buffer = io.BytesIO()
    Image.frombytes("I;16", (width, height), pixels.tobytes()).save(buffer, "PNG")
    return buffer.getvalue()


PEAK_SCRIPT = """
import resource, sys
from managertower.data.images import sanitize_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = sanitize_image(data, max_side=512)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(after - before, result.width, result.height)
"""


def test_a_large_16_bit_png_is_converted_in_bounded_memory(tmp_path):
    """The bound: PIL's decoded 16-bit image (2 bytes a pixel, unavoidable) plus the 8-bit gray result (1 byte
    a pixel) plus 32 MB for the tiles' temporaries, the downsized copy and the allocator's slack. The old
    float64 conversion of the whole image needed about 27 bytes a pixel (243 MB here; 2.3 GB at 9400x9400)."""
    side = 3000
    path = tmp_path / "gray16.png"
    path.write_bytes(gray16_png(side, side))
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    peak_kb, width, height = map(int, run.stdout.split())
    bound_kb = (3 * side * side + (32 << 20)) // 1024
    assert (width, height) == (512, 512)
    assert peak_kb < bound_kb, f"peak {peak_kb // 1024} MB over the bound {bound_kb // 1024} MB"


def old_high_bit_conversion(data: bytes, max_side: int | None, quality: int = 90) -> bytes:
    """What the sanitiser did before: the whole image as float64, rescaled, RGB, then downsized."""
    image = Image.open(io.BytesIO(data))
    image.load()
    pixels = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
    gray = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgb = Image.fromarray(gray, "L").convert("RGB")
    if max_side is not None and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        target = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()


def encoded(mode: str, pixels: np.ndarray, fmt: str) -> bytes:
    height, width = pixels.shape
    if mode == "I;16":
        image = Image.frombytes("I;16", (width, height), pixels.astype("<u2").tobytes())
    else:
        image = Image.fromarray(pixels.astype(np.int32 if mode == "I" else np.float32), mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == mode
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt, low, high, size, max_side", [
    ("I;16", "PNG", 0, 65536, (37, 23), 512),        # kept size
    ("I;16", "PNG", 0, 65536, (130, 90), 64),        # downsized
    ("I", "TIFF", -300, 70000, (61, 40), 32),         # 32-bit, out of range both ways
    ("I", "TIFF", 0, 256, (45, 33), None),            # 32-bit holding 8-bit values: not rescaled
    ("F", "TIFF", -10.0, 300.0, (52, 31), 40),        # float
])
def test_16_and_32_bit_gray_gives_the_same_pixels_as_the_old_conversion(monkeypatch, mode, fmt, low, high, size,
                                                                         max_side):
    rng = np.random.default_rng(0)
    width, height = size
    values = rng.uniform(low, high, (height, width)) if mode == "F" else rng.integers(low, high, (height, width))
    data = encoded(mode, values, fmt)
    monkeypatch.setattr(images, "TILE_PIXELS", 50)  # many tiles, split across rows and columns
    assert sanitize_image(data, max_side=max_side).jpeg == old_high_bit_conversion(data, max_side)


# -- 6. values refused before anything starts ----------------------------------------------------------

@pytest.mark.parametrize("flag, value, named", [
    ("--max-image-side", "-5", "--max-image-side"),
    ("--quality", "1000", "--quality"),
    ("--quality", "0", "--quality"),
    ("--samples-per-shard", "0", "--samples-per-shard"),
    ("--workers", "-1", "--workers"),
    ("--workers", "0", "--workers"),
    ("--part", "2/2", "--part"),
])
def test_senseless_values_are_one_line_errors_before_anything_starts(tmp_path, capsys, flag, value, named):
    root = write_coco(tmp_path / "coco")
    out = tmp_path / "out"
    code, err = run_door(capsys, "coco", "--root", root, "--out", out, "--quiet", flag, value)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert named in err and value in err
    assert not out.exists()


@pytest.mark.parametrize("settings", [
    dict(max_image_side=-5), dict(quality=1000), dict(quality=2.5), dict(samples_per_shard=0),
    dict(samples_per_shard=True), dict(workers=-1), dict(seed="7"), dict(part=(1, 1)), dict(part="x"),
])
def test_the_library_checks_the_same_values(tmp_path, settings):
    with pytest.raises(DataprepError):
        PrepSettings(**settings)
    with pytest.raises(DataprepError):  # before the (missing) annotations are even looked at
        prepare("coco", tmp_path / "nowhere", tmp_path / "out", progress=False, summary=False, **settings)
    assert not (tmp_path / "out").exists()


def test_sensible_values_pass_and_zero_keeps_the_image_size():
    assert PrepSettings(max_image_side=0).max_image_side is None
    assert PrepSettings(quality=100, workers=3, part="1/4").part == (1, 4)


# -- 7. malformed annotations: one line naming file and line, or counted with --skip-bad-lines ----------

def write_cc3m(root, lines: list[bytes]) -> str:
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "Train_GCC-training.tsv"), "wb") as handle:
        handle.writelines(line + b"\n" for line in lines)
    for row in range(len(lines)):
        Image.new("RGB", (20, 20), (30, 30, 200)).save(os.path.join(root, "images", f"{row}.jpg"))
    return str(root)


def write_nlvr2(root, lines: list[bytes]) -> str:
    os.makedirs(os.path.join(root, "images", "dev"), exist_ok=True)
    with open(os.path.join(root, "dev.json"), "wb") as handle:
        handle.writelines(line + b"\n" for line in lines)
    for pair in range(len(lines)):
        for side in (0, 1):
            Image.new("RGB", (20, 20), (30, 200, 30)).save(os.path.join(root, "images", "dev",
                                                                        f"dev-{pair}-0-img{side}.png"))
    return str(root)


def nlvr2_line(pair: int, sentence: str = "two dogs") -> bytes:
    return json.dumps({"identifier": f"dev-{pair}-0-0", "sentence": sentence, "label": "True"}).encode()


def assert_one_line(code: int, err: str, *names: str) -> None:
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, err


BAD_BYTE = b"caf\xe9"  # latin-1 in a UTF-8 file


def test_a_non_utf8_byte_in_a_cc3m_tsv_names_file_and_line(tmp_path, capsys):
    lines = [b"a dog\thttp://x/0.jpg", b"a cat\thttp://x/1.jpg", BAD_BYTE + b" au lait\thttp://x/2.jpg",
             b"no tab here", b"a bird\thttp://x/4.jpg"]
    root = write_cc3m(tmp_path / "cc3m", lines)
    code, err = run_door(capsys, "cc3m", "--root", root, "--out", tmp_path / "out", "--quiet")
    assert_one_line(code, err, "Train_GCC-training.tsv, line 3", "not UTF-8", "0xe9", "--skip-bad-lines")
    assert not (tmp_path / "out").exists()

    code = main(["cc3m", "--root", root, "--out", str(tmp_path / "out"), "--quiet", "--skip-bad-lines"])
    output = capsys.readouterr().out
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["samples"] == 3 and manifest["skipped"] == {"bad_line": 2}
    assert "bad_line 2" in output and "Train_GCC-training.tsv, line 3" in output
    run = json.loads((tmp_path / "out" / ".dataprep" / "runs" / "train.part-0000-of-0001.json").read_text())
    assert [line.split(": ")[0].rsplit("/", 1)[-1] for line in run["bad_lines"]] == \
        ["Train_GCC-training.tsv, line 3", "Train_GCC-training.tsv, line 4"]
    # Row indexes stay the ids around a skipped line: row 4 is still image 4.
    assert sorted(meta["image_id"] for meta in iter_metadata(expand_shards(str(tmp_path / "out")))) == [0, 1, 4]


@pytest.mark.parametrize("bad, message", [
    (BAD_BYTE, "not UTF-8"),
    (b'{"identifier": "dev-1-0-0", "sentence": ', "malformed JSON line"),
    (b'{"sentence": "no identifier"}', "missing field"),
    (b'["a", "list"]', "expected a JSON object"),
])
def test_a_bad_json_line_names_file_and_line_or_is_counted(tmp_path, capsys, bad, message):
    root = write_nlvr2(tmp_path / "nlvr2", [nlvr2_line(0), bad, nlvr2_line(2)])
    out = tmp_path / "out"
    code, err = run_door(capsys, "nlvr2", "--root", root, "--out", out, "--split", "dev", "--quiet")
    assert_one_line(code, err, "dev.json, line 2", message)
    code, _ = run_door(capsys, "nlvr2", "--root", root, "--out", out, "--split", "dev", "--quiet",
                       "--skip-bad-lines")
    manifest = json.loads((out / "manifest.json").read_text())
    assert code == 0 and manifest["samples"] == 2 and manifest["skipped"] == {"bad_line": 1}


def test_a_bad_snli_ve_line_is_counted_and_the_rest_kept(tmp_path, capsys):
    root = tmp_path / "snli"
    os.makedirs(root / "flickr30k-images")
    records = [{"gold_label": "entailment", "sentence1": "a man", "sentence2": "a person", "Flikr30kID": f"{i}.jpg"}
               for i in range(3)]
    lines = [json.dumps(record).encode() for record in records]
    lines[1] = lines[1].replace(b"a person", b"a p\xffrson")
    (root / "snli_ve_dev.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    for i in range(3):
        Image.new("RGB", (20, 20), (200, 30, 30)).save(root / "flickr30k-images" / f"{i}.jpg")
    code, err = run_door(capsys, "snli_ve", "--root", root, "--out", tmp_path / "out", "--split", "dev", "--quiet")
    assert_one_line(code, err, "snli_ve_dev.jsonl, line 2", "0xff")
    manifest = prepare("snli_ve", root, tmp_path / "out", "dev", progress=False, summary=False,
                       skip_bad_lines=True)
    assert manifest["samples"] == 2 and manifest["skipped"] == {"bad_line": 1}


def test_a_non_utf8_sbu_url_line_is_one_line_or_skipped_keeping_the_files_aligned(tmp_path, capsys):
    root = tmp_path / "sbu"
    os.makedirs(root / "images")
    urls = [b"http://x/a.jpg", b"http://x/" + BAD_BYTE + b".jpg", b"http://x/c.jpg"]
    (root / "SBU_captioned_photo_dataset_urls.txt").write_bytes(b"\n".join(urls) + b"\n")
    (root / "SBU_captioned_photo_dataset_captions.txt").write_text("caption a\ncaption b\ncaption c\n")
    for name in ("a", "c"):
        Image.new("RGB", (20, 20), (200, 30, 30)).save(root / "images" / f"{name}.jpg")
    code, err = run_door(capsys, "sbu", "--root", root, "--out", tmp_path / "out", "--quiet")
    assert_one_line(code, err, "SBU_captioned_photo_dataset_urls.txt, line 2", "not UTF-8")
    code, _ = run_door(capsys, "sbu", "--root", root, "--out", tmp_path / "out", "--quiet", "--skip-bad-lines")
    captions = {meta["image_id"]: meta["captions"] for meta in iter_metadata(expand_shards(str(tmp_path / "out")))}
    assert code == 0 and captions == {"a": ["caption a"], "c": ["caption c"]}


def test_a_karpathy_record_without_filename_names_file_and_key(tmp_path, capsys):
    root = write_coco(tmp_path / "coco")
    data = json.loads((tmp_path / "coco" / "dataset_coco.json").read_text())
    del data["images"][1]["filename"]
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps(data))
    code, err = run_door(capsys, "coco", "--root", root, "--out", tmp_path / "out", "--quiet")
    assert_one_line(code, err, "dataset_coco.json", "filename", "images[1]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("image_id", ["abc", 1.5, None, [3]])
def test_a_vqav2_image_id_that_is_not_a_whole_number_names_file_and_key(tmp_path, capsys, image_id):
    root = tmp_path / "vqav2"
    os.makedirs(root / "val2014")
    questions = [{"image_id": 42, "question_id": 420, "question": "what?"},
                 {"image_id": image_id, "question_id": 421, "question": "why?"}]
    annotations = [{"question_id": q, "multiple_choice_answer": "yes", "answers": [{"answer": "yes"}]}
                   for q in (420, 421)]
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    code, err = run_door(capsys, "vqav2", "--root", root, "--out", tmp_path / "out", "--split", "val", "--quiet")
    assert_one_line(code, err, "v2_OpenEnded_mscoco_val2014_questions.json", "questions[1].image_id",
                    "not a whole number")


def test_a_non_utf8_byte_in_a_json_document_names_its_line(tmp_path, capsys):
    root = write_coco(tmp_path / "coco")
    path = tmp_path / "coco" / "dataset_coco.json"
    text = json.dumps(json.loads(path.read_text()), indent=1).encode()
    path.write_bytes(text.replace(b"a red picture 2", b"a red " + BAD_BYTE))
    line = text[: text.index(b"a red picture 2")].count(b"\n") + 1
    code, err = run_door(capsys, "coco", "--root", root, "--out", tmp_path / "out", "--quiet")
    assert_one_line(code, err, f"dataset_coco.json, line {line}", "not UTF-8")
