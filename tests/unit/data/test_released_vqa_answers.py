"""VQAv2 answers as the authors' released dataprep makes them (LooperXX/ManagerTower, src/utils/write_vqa.py
with src/utils/glossary.py): normalisation, the answer vocabulary and its order, the soft scores."""
from __future__ import annotations

import json
import os

from PIL import Image

from managertower.data.formats import READERS
from managertower.data.formats.vqa_answers import answer_score, answer_vocabulary, normalize_answer, soft_scores
from managertower.data.prep import prepare
from managertower.tasks import metrics

# raw answer -> as the released glossary.normalize_word spells it
NORMALISED = {
    "Two": "2", "2 ": "2", "None": "0", "TEN": "10", "10 people": "10 people", "1,000": "1000", "3.5": "3.5",
    "yes.": "yes", "Yes!": "yes", "a dog": "dog", "The Dog": "dog", "an apple": "apple", "the": "",
    "isn't": "isn't", "isnt": "isn't", "dont know": "don't know", "couldnt've": "couldn't've",
    "couldn'tve": "couldn't've", "yall'd've": "y'all'd've", "twas": "'twas", "ow's'at": "'ow's'at",
    "oclock": "o'clock", "maam": "ma'am", "hed": "he'd",
    # the evaluation's table has no "its" / "lets" / "shes", and spells I'm / I've capitalised (never matched)
    "its": "its", "lets": "lets", "shes": "shes", "im": "im", "Ive": "ive",
    # its one entry the other way round
    "somebody'd": "somebodyd",
    # the space-or-not test reads the answer as given, not the text the earlier marks changed
    "x;-y-z": "x y z", "x\t-y-z": "x y z", "left/right": "left right", "left / right": "left right",
    "(a) red": "red", "red, white": "red white",
    # at most 32 full stops go: re.UNICODE lands in re.sub's `count`
    "." * 40 + "x": "." * 8 + "x",
}


def test_released_answer_normalisation():
    """glossary.py `normalize_word` (lines 168-190), applied by write_vqa.py to the multiple-choice answers
    (line 100) and to every annotator answer (line 114): punctuation tested against the original token
    (lines 170-176), `period_strip.sub(..., re.UNICODE)` (line 177), lowercase, `manual_map` digits, articles,
    then the `contractions` table (lines 3-124)."""
    got = {raw: normalize_answer(raw) for raw in NORMALISED}
    assert got == NORMALISED


def test_released_vocabulary_counts_train_then_val_in_order_of_first_appearance():
    """write_vqa.py lines 92-103: `all_major_answers` = train then val `multiple_choice_answer`, normalised;
    `counter = {k: v for k, v in Counter(...).items() if v >= 9}` keeps the counter's insertion order (first
    appearance, not frequency) and `ans2label = {k: i for i, k in enumerate(counter.keys())}`; the empty
    answer ("the" normalised) is a class like any other."""
    train = ["no"] * 3 + ["Two"] * 5 + ["yes"] * 12 + ["2"] * 4 + ["red"] * 4
    val = ["no."] * 6 + ["the"] * 9 + ["Red"] * 4
    assert answer_vocabulary(train + val) == ["no", "2", "yes", ""]  # 9, 9, 12, 9; "red" 8 is too rare
    assert answer_vocabulary(train + val, min_count=8) == ["no", "2", "yes", "red", ""]


def test_released_soft_scores_are_the_lookup_in_order_of_first_appearance():
    """write_vqa.py `get_score` (lines 13-23): 0 -> 0.0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, more -> 1.0, exact
    values; lines 110-117 count the normalised answers in a dict (first appearance, "" included)."""
    assert [answer_score(count) for count in range(11)] == [0.0, 0.3, 0.6, 0.9] + [1.0] * 7
    assert [metrics.vqa_soft_score(count) for count in range(11)] == [0.0, 0.3, 0.6, 0.9] + [1.0] * 7
    scores = soft_scores(["yes", "Yes", "no", "a", "Two", "two", "2", "2", "no", "the"])
    assert list(scores.items()) == [("yes", 0.6), ("no", 0.6), ("", 0.6), ("2", 1.0)]


def _write_vqa(root, train_answers: list[str], val_answers: list[str]) -> None:
    """A VQAv2 folder whose questions have the given multiple-choice answers, ten annotators each giving it."""
    question_id = 1
    for folder, image_id, answers in (("train2014", 1, train_answers), ("val2014", 2, val_answers)):
        os.makedirs(root / folder, exist_ok=True)
        Image.new("RGB", (32, 24), (200, 30, 30)).save(root / folder / f"COCO_{folder}_{image_id:012d}.jpg")
        questions, annotations = [], []
        for answer in answers:
            questions.append({"image_id": image_id, "question": f"question {question_id}?", "question_id": question_id})
            annotations.append({"question_id": question_id, "image_id": image_id, "multiple_choice_answer": answer,
                                "answers": [{"answer": answer, "answer_id": k + 1} for k in range(10)]})
            question_id += 1
        with open(root / f"v2_OpenEnded_mscoco_{folder}_questions.json", "w") as handle:
            json.dump({"questions": questions}, handle)
        with open(root / f"v2_mscoco_{folder}_annotations.json", "w") as handle:
            json.dump({"annotations": annotations}, handle)


def test_released_answer_vocab_json_is_the_released_class_order(tmp_path):
    """write_vqa.py lines 92-103 through our dataprep: OUT/answer_vocab.json lists the classes in the released
    `label2ans` order, so row i of a released VQA head is answer i; the reader reports the size."""
    root = tmp_path / "vqa"
    _write_vqa(root, ["Two"] * 2 + ["yes"] * 12 + ["no"] * 3, ["no"] * 6 + ["2"] * 7 + ["blue"] * 8)
    prepare("vqav2", root, tmp_path / "out", "val", progress=False, summary=False)
    vocabulary = json.loads((tmp_path / "out" / "answer_vocab.json").read_text())
    assert vocabulary == ["2", "yes", "no"]  # first seen in that order; frequency order would be yes, 2, no
    notes = READERS["vqav2"](root, "train").notes()
    assert notes == {"answer_vocab_size": 3, "answer_vocab_min_count": 9,
                     "answer_vocab_from": ["v2_mscoco_train2014_annotations.json",
                                           "v2_mscoco_val2014_annotations.json"]}
