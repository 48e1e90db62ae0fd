"""Each reader on small fixtures written in the dataset's real raw format, through the real driver."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from PIL import Image

from dataprep.__main__ import build_parser, main, reader_settings
from managertower.data.formats import READERS
from managertower.data.formats.vqav2 import normalize_answer, soft_scores
from managertower.data.prep import prepare
from managertower.data.shards import expand_shards, iter_shard

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


# -- helpers (the shared conftest belongs to others; these stay in this file) ----------------------------

def write_image(path, index: int = 0, fmt: str = "JPEG", size=(48, 36)) -> None:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.new("RGB", size, COLOURS[index % len(COLOURS)]).save(str(path), fmt)


def write_json(path, payload, lines: bool = False) -> None:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as handle:
        if lines:
            handle.writelines(json.dumps(record) + "\n" for record in payload)
        else:
            json.dump(payload, handle)


def shard(source, root, out, split=None, **kwargs) -> tuple[dict, dict[str, dict]]:
    """Run the driver; return (run manifest, {key: sample with parsed 'meta'})."""
    manifest = prepare(source, root, out, split, progress=False, summary=False, samples_per_shard=2, **kwargs)
    samples = {}
    for path in expand_shards(str(out)):
        if os.path.basename(path).startswith(f"{manifest['split']}-"):
            for sample in iter_shard(path):
                sample["meta"] = json.loads(sample["json"])
                samples[sample["__key__"]] = sample
    return manifest, samples


def pixel(sample, ext="jpg"):
    return Image.open(io.BytesIO(sample[ext])).convert("RGB").getpixel((10, 10))


def karpathy_record(filename, split, captions, **extra):
    return dict(filename=filename, split=split, sentences=[{"raw": c, "tokens": c.split()} for c in captions], **extra)


# -- readers ---------------------------------------------------------------------------------------------

def test_coco_karpathy_train_is_train_plus_restval_with_duplicates_removed(tmp_path):
    root = tmp_path / "coco"
    images = []
    for cocoid, split in ((1, "train"), (2, "restval"), (3, "val"), (4, "test"), (5, "train")):
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        if cocoid != 5:  # image 5 is listed but was never downloaded
            write_image(root / folder / name, cocoid)
        images.append(karpathy_record(name, split, ["A dog runs.", "a dog  runs", f"caption {cocoid}"],
                                      filepath=folder, cocoid=cocoid))
    write_json(root / "dataset_coco.json", {"images": images})

    manifest, samples = shard("coco", root, tmp_path / "out")
    assert sorted(samples) == ["coco_1", "coco_2"]
    assert samples["coco_1"]["meta"]["captions"] == ["A dog runs.", "caption 1"]
    assert manifest["skipped"] == {"missing": 1} and manifest["captions"] == 4
    assert pixel(samples["coco_2"])[0] < 60 and pixel(samples["coco_2"])[2] > 150  # image 2 is the blue one

    _, test = shard("coco", root, tmp_path / "out", "test")
    assert sorted(test) == ["coco_4"] and test["coco_4"]["meta"]["split"] == "test"
    ids = tmp_path / "exclude.txt"
    ids.write_text("2\n# a comment\n")
    manifest, samples = shard("coco", root, tmp_path / "out2", exclude_ids=str(ids))
    assert sorted(samples) == ["coco_1"] and manifest["skipped"] == {"excluded": 1, "missing": 1}


def test_flickr30k_karpathy_splits(tmp_path):
    root = tmp_path / "flickr"
    records = []
    for index, split in enumerate(("train", "train", "val", "test")):
        name = f"{1000 + index}.jpg"
        write_image(root / "flickr30k-images" / name, index)
        records.append(karpathy_record(name, split, [f"a photo number {index}", "people"], imgid=index))
    write_json(root / "dataset_flickr30k.json", {"images": records})
    _, train = shard("flickr30k", root, tmp_path / "out")
    _, val = shard("flickr30k", root, tmp_path / "out", "val")
    assert sorted(train) == ["flickr30k_1000", "flickr30k_1001"] and sorted(val) == ["flickr30k_1002"]
    assert val["flickr30k_1002"]["meta"]["image_id"] == 1002


def test_visual_genome_dedupes_phrases_and_rescales_region_boxes(tmp_path):
    root = tmp_path / "vg"
    write_image(root / "VG_100K" / "1.jpg", 0, size=(200, 100))
    write_image(root / "VG_100K_2" / "2.jpg", 1)
    region = lambda rid, image_id, phrase, x: {"region_id": rid, "image_id": image_id, "phrase": phrase,  # noqa: E731
                                               "x": x, "y": 10, "width": 50, "height": 20}
    write_json(root / "region_descriptions.json", [
        {"id": 1, "regions": [region(1, 1, "white clouds", 0), region(2, 1, "White clouds ", 100), region(3, 1, "a tree", 20)]},
        {"id": 2, "regions": [region(4, 2, "a cat", 0)]},
        {"id": 3, "regions": [region(5, 3, "gone", 0)]}])
    write_json(root / "image_data.json", [{"image_id": i, "url": "", "width": 1, "height": 1, "coco_id": i * 10,
                                           "flickr_id": None} for i in (1, 2, 3)])
    manifest, samples = shard("vg", root, tmp_path / "out", regions=True, max_image_side=100)
    meta = samples["vg_1"]["meta"]
    assert meta["captions"] == ["white clouds", "a tree"] and (meta["width"], meta["height"]) == (100, 50)
    assert meta["regions"][0] == {"phrase": "white clouds", "box": [0.0, 5.0, 25.0, 10.0]}
    assert samples["vg_2"]["meta"]["captions"] == ["a cat"] and manifest["skipped"] == {"missing": 1}
    coco_ids = tmp_path / "coco_ids.json"
    coco_ids.write_text("[20]")
    _, samples = shard("vg", root, tmp_path / "out2", exclude_coco_ids=str(coco_ids))
    assert sorted(samples) == ["vg_1"] and "regions" not in samples["vg_1"]["meta"]


def test_cc3m_tsv_with_row_index_images(tmp_path):
    root = tmp_path / "cc3m"
    (root / "images").mkdir(parents=True)
    (root / "Train_GCC-training.tsv").write_text("a red car\thttp://x/a.jpg\nno image here\thttp://x/b.jpg\n"
                                                 "a blue sky\thttp://x/c.png\n")
    write_image(root / "images" / "0.jpg", 0)
    write_image(root / "images" / "2.png", 2, fmt="PNG")  # any extension; converted to JPEG
    manifest, samples = shard("cc3m", root, tmp_path / "out")
    assert sorted(samples) == ["cc3m_000000000", "cc3m_000000002"]
    assert samples["cc3m_000000002"]["meta"]["captions"] == ["a blue sky"]
    assert samples["cc3m_000000002"]["meta"]["url"] == "http://x/c.png"
    assert manifest["skipped"] == {"missing": 1}


@pytest.mark.parametrize("layout", ["json", "text"])
def test_sbu_both_layouts(tmp_path, layout):
    root = tmp_path / "sbu"
    urls = ["http://static.flickr.com/1/111_aa.jpg", "http://static.flickr.com/2/222_bb.jpg"]
    captions = ["Man on a bike", "a boat at sea"]
    if layout == "json":
        write_json(root / "sbu-captions-all.json", {"image_urls": urls, "captions": captions, "user_ids": ["u", "v"]})
    else:
        root.mkdir()
        (root / "SBU_captioned_photo_dataset_urls.txt").write_text("\n".join(urls) + "\n")
        (root / "SBU_captioned_photo_dataset_captions.txt").write_text("\n".join(captions) + "\n")
    write_image(root / "images" / "111_aa.jpg", 0)
    write_image(root / "images" / "sub" / "222_bb.jpg", 1)
    _, samples = shard("sbu", root, tmp_path / "out")
    assert {key: s["meta"]["captions"] for key, s in samples.items()} == {
        "sbu_111_aa": ["Man on a bike"], "sbu_222_bb": ["a boat at sea"]}


def test_img2dataset_output_tars(tmp_path):
    root = tmp_path / "i2d"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for key, caption in (("000000001", "a green field"), ("000000007", "a red door")):
            image = io.BytesIO()
            Image.new("RGB", (30, 30), COLOURS[int(key[-1]) % 5]).save(image, "JPEG")
            for ext, payload in (("jpg", image.getvalue()), ("txt", caption.encode()),
                                 ("json", json.dumps({"url": f"http://x/{key}", "caption": caption, "key": key,
                                                      "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "00000_stats.json").write_text("{}")
    _, samples = shard("img2dataset", root, tmp_path / "out", source_name="cc3m")
    assert sorted(samples) == ["cc3m_000000001", "cc3m_000000007"]
    meta = samples["cc3m_000000007"]["meta"]
    assert meta["captions"] == ["a red door"] and meta["source"] == "cc3m" and meta["url"] == "http://x/000000007"
    assert pixel(samples["cc3m_000000001"])[1] > 150  # key ...1 -> green


def write_vqa_fixture(root):
    for folder, image_ids in (("train2014", (1, 2)), ("val2014", (3,)), ("test2015", (4,))):
        for image_id in image_ids:
            write_image(root / folder / f"COCO_{folder}_{image_id:012d}.jpg", image_id)
    answers = lambda *texts: [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]  # noqa: E731
    questions = [{"image_id": 1, "question": "How many dogs?", "question_id": 10},
                 {"image_id": 1, "question": "What colour?", "question_id": 11},
                 {"image_id": 2, "question": "Is it raining?", "question_id": 20}]
    annotations = [
        {"question_id": 10, "image_id": 1, "multiple_choice_answer": "2",
         "answers": answers("two", "2", "2", "Two", "2", "2", "2", "three", "3", "2")},
        {"question_id": 11, "image_id": 1, "multiple_choice_answer": "red", "answers": answers(*["red"] * 9, "the red")},
        {"question_id": 20, "image_id": 2, "multiple_choice_answer": "no", "answers": answers(*["no"] * 10)}]
    write_json(root / "v2_OpenEnded_mscoco_train2014_questions.json", {"questions": questions})
    write_json(root / "v2_mscoco_train2014_annotations.json", {"annotations": annotations})
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json",
               {"questions": [{"image_id": 3, "question": "What is it?", "question_id": 30}]})
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 30, "image_id": 3, "multiple_choice_answer": "2", "answers": answers(*["2"] * 10)}]})
    write_json(root / "v2_OpenEnded_mscoco_test2015_questions.json",
               {"questions": [{"image_id": 4, "question": "Why?", "question_id": 40}]})


def test_vqav2_groups_questions_with_soft_scores_and_writes_the_answer_vocab(tmp_path):
    root = tmp_path / "vqa"
    write_vqa_fixture(root)
    _, samples = shard("vqav2", root, tmp_path / "out", min_answer_count=2)
    questions = {q["question_id"]: q for q in samples["vqav2_train2014_1"]["meta"]["questions"]}
    assert questions[10]["answers"] == {"2": 1.0, "3": 0.6}  # 'two'/'Two' count as '2': 8 -> 1.0; 2 -> .6
    assert questions[11]["answers"] == {"red": 1.0}  # 'the red' normalises to 'red'
    assert samples["vqav2_train2014_2"]["meta"]["questions"][0]["answers"] == {"no": 1.0}
    # train+val multiple-choice answers: '2' twice, 'red' and 'no' once -> only '2' reaches 2
    assert json.loads((tmp_path / "out" / "answer_vocab.json").read_text()) == ["2"]
    _, test = shard("vqav2", root, tmp_path / "out", "test")
    assert test["vqav2_test2015_4"]["meta"]["questions"] == [{"question_id": 40, "question": "Why?"}]


def test_vqa_answer_normalisation_and_scores():
    assert normalize_answer(" The Two dogs!") == "2 dogs"
    assert normalize_answer("dont know") == "don't know" and normalize_answer("yes.") == "yes"
    assert normalize_answer("1,000") == "1000" and normalize_answer("an apple") == "apple"
    assert soft_scores(["cat"] + ["dog"] * 2 + ["cow"] * 3 + ["pig"] * 4) == {"cat": 0.3, "dog": 0.6, "cow": 0.9, "pig": 1.0}


def test_nlvr2_one_sample_per_pair_with_grouped_statements(tmp_path):
    root = tmp_path / "nlvr2"
    records = []
    for pair, directory in (("train-5-0", "3"), ("train-5-1", "7")):
        for side in (0, 1):
            write_image(root / "images" / "train" / directory / f"{pair}-img{side}.png", side, fmt="PNG")
        for sentence in range(2):
            records.append({"identifier": f"{pair}-{sentence}", "sentence": f"statement {sentence}",
                            "label": "True" if sentence == 0 else "False", "directory": directory,
                            "left_url": "", "right_url": ""})
    records.append({"identifier": "train-6-0-0", "sentence": "its right image is gone", "label": "False",
                    "directory": "1"})
    write_image(root / "images" / "train" / "1" / "train-6-0-img0.png", 0, fmt="PNG")
    write_json(root / "train.json", records, lines=True)
    manifest, samples = shard("nlvr2", root, tmp_path / "out")
    assert sorted(samples) == ["nlvr2_train-5-0", "nlvr2_train-5-1"] and manifest["skipped"] == {"missing": 1}
    sample = samples["nlvr2_train-5-0"]
    assert sample["meta"]["statements"] == [
        {"identifier": "train-5-0-0", "sentence": "statement 0", "label": 1},
        {"identifier": "train-5-0-1", "sentence": "statement 1", "label": 0}]
    assert pixel(sample)[0] > 150 and pixel(sample, "img1.jpg")[1] > 150  # img0 red, img1 green
    assert manifest["images"] == 4  # two pairs, two images each


def test_snli_ve_groups_hypotheses_and_accepts_both_id_spellings(tmp_path):
    root = tmp_path / "snli"
    for image_id in (11, 22):
        write_image(root / "flickr30k_images" / f"{image_id}.jpg", image_id)
    rows = [{"gold_label": "entailment", "sentence1": "A man.", "sentence2": "A person.", "pairID": "p1", "Flikr30kID": "11.jpg"},
            {"gold_label": "contradiction", "sentence1": "A man.", "sentence2": "A cat.", "pairID": "p2", "Flikr30kID": "11.jpg"},
            {"gold_label": "neutral", "sentence1": "Kids.", "sentence2": "Kids at school.", "pairID": "p3", "Flickr30K_ID": "22"},
            {"gold_label": "-", "sentence1": "Kids.", "sentence2": "Unclear.", "pairID": "p4", "Flickr30K_ID": "22"}]
    write_json(root / "snli_ve_dev.jsonl", rows, lines=True)
    manifest, samples = shard("snli_ve", root, tmp_path / "out", "dev")
    assert samples["snli_ve_11"]["meta"]["hypotheses"] == [{"pair_id": "p1", "text": "A person.", "label": 2},
                                                           {"pair_id": "p2", "text": "A cat.", "label": 0}]
    assert samples["snli_ve_11"]["meta"]["captions"] == ["A man."]
    assert samples["snli_ve_22"]["meta"]["hypotheses"] == [{"pair_id": "p3", "text": "Kids at school.", "label": 1}]
    assert manifest["skipped"] == {"no_gold_label": 1}


def test_every_source_has_a_layout_in_its_help(capsys):
    for source in READERS:
        with pytest.raises(SystemExit):
            main([source, "--help"])
        assert "layout" in capsys.readouterr().out


def test_reader_options_are_the_doors_flags_and_reach_the_reader(tmp_path, capsys):
    # Readers declare their options as data; the door makes the flags and hands over only what was given.
    for source, reader in READERS.items():
        with pytest.raises(SystemExit):
            main([source, "--help"])
        out = capsys.readouterr().out
        assert all(option.flag in out for option in reader.reader_options), source
    parser = build_parser()
    given = parser.parse_args(["vqav2", "--root", "r", "--out", "o", "--vocab-annotations", "a.json", "b.json",
                               "--min-answer-count", "3", "--exclude-ids", "ids.txt"])
    assert reader_settings(given) == {"vocab_annotations": ["a.json", "b.json"], "min_answer_count": 3,
                                      "exclude_ids": "ids.txt"}
    assert reader_settings(parser.parse_args(["vg", "--root", "r", "--out", "o"])) == {}  # --regions not given
    assert reader_settings(parser.parse_args(["vg", "--root", "r", "--out", "o", "--regions"])) == {"regions": True}
    root = tmp_path / "i2d"  # and through the whole door: --source-name renames the samples
    root.mkdir()
    image = io.BytesIO()
    Image.new("RGB", (30, 30), COLOURS[0]).save(image, "JPEG")
    with tarfile.open(root / "00000.tar", "w") as tar:
        for ext, payload in (("jpg", image.getvalue()), ("txt", b"a red door")):
            info = tarfile.TarInfo(f"000000007.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert main(["img2dataset", "--root", str(root), "--out", str(tmp_path / "out"), "--source-name", "sbu",
                 "--quiet"]) == 0
    assert [sample["__key__"] for path in expand_shards(str(tmp_path / "out")) for sample in iter_shard(path)] \
        == ["sbu_000000007"]


# -- clear errors for bad annotations --------------------------------------------------------------------

def run_main(capsys, *argv) -> tuple[int, str]:
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.err


def test_missing_annotation_file_is_one_clear_line(tmp_path, capsys):
    code, err = run_main(capsys, "coco", "--root", tmp_path, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "dataset_coco.json" in err and "not found" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_wrong_layout_names_the_key(tmp_path, capsys):
    write_json(tmp_path / "dataset_coco.json", {"annotations": []})  # a captions_*.json, not Karpathy's file
    code, err = run_main(capsys, "coco", "--root", tmp_path, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "key 'images'" in err and "dataset_coco.json" in err
    write_json(tmp_path / "dataset_coco.json", {"images": [{"filename": "a.jpg", "split": "train"}]})
    code, err = run_main(capsys, "coco", "--root", tmp_path, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "'sentences'" in err and "images[0]" in err
    assert not (tmp_path / "out").exists()


def test_malformed_json_line_names_the_line_number(tmp_path, capsys):
    good = {"identifier": "dev-1-0-0", "sentence": "s", "label": "True"}
    (tmp_path / "images" / "dev").mkdir(parents=True)
    (tmp_path / "dev.json").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    code, err = run_main(capsys, "nlvr2", "--root", tmp_path, "--out", tmp_path / "out", "--split", "dev", "--quiet")
    assert code == 2 and "dev.json, line 3" in err and "malformed JSON line" in err
    assert not (tmp_path / "out").exists()


def test_malformed_tsv_line_and_unaligned_sbu_files(tmp_path, capsys):
    (tmp_path / "Train_GCC-training.tsv").write_text("ok caption\thttp://x\nno tab on this line\n")
    code, err = run_main(capsys, "cc3m", "--root", tmp_path, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "line 2" in err
    (tmp_path / "SBU_captioned_photo_dataset_urls.txt").write_text("http://a/1.jpg\nhttp://a/2.jpg\n")
    (tmp_path / "SBU_captioned_photo_dataset_captions.txt").write_text("one caption\n")
    code, err = run_main(capsys, "sbu", "--root", tmp_path, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "line-aligned" in err


def test_vqa_annotations_not_matching_questions(tmp_path, capsys):
    write_vqa_fixture(tmp_path)
    write_json(tmp_path / "v2_mscoco_train2014_annotations.json", {"annotations": []})
    code, err = run_main(capsys, "vqav2", "--root", tmp_path, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "question_id 10" in err and "v2_mscoco_train2014_annotations.json" in err
