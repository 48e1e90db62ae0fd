"""VQAv2: one sample per COCO image holding all its questions, each with soft-scored answers.

Scores follow the VQA evaluation: an answer given by k of the 10 annotators scores min(1, 0.3 k)
(0, .3, .6, .9, 1), after the evaluation's answer normalisation. The answer vocabulary follows the
released code (ViLT / METER / BridgeTower): the normalised `multiple_choice_answer` of every question in
the train and val annotations, kept when seen at least --min-answer-count (9) times: 3129 answers.
"""
from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from typing import Any, Iterator

from managertower.data.formats.base import (AnnotationError, Item, RawDataset, ReaderOption, load_json, require,
                                            require_list, sample_key)
from managertower.data.images import ImageSource

# split -> (questions file stem, annotations file stem or None, image folder = COCO file-name prefix)
VQA_SPLITS = {
    "train": ("train2014", "train2014", "train2014"),
    "val": ("val2014", "val2014", "val2014"),
    "test": ("test2015", None, "test2015"),
    "test-dev": ("test-dev2015", None, "test2015"),
}
VOCAB_FILE = "answer_vocab.json"

# A subset of the official VQA evaluation normalisation (vqaEval.py): contractions, punctuation, digits,
# articles. Enough to merge the spellings annotators actually vary in ("two" / "2", "a dog" / "dog").
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "didnt": "didn't", "couldnt": "couldn't",
                 "shouldnt": "shouldn't", "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't",
                 "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "whats": "what's",
                 "thats": "that's", "lets": "let's", "its": "it's", "hes": "he's", "shes": "she's"}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    text = " ".join(str(answer).replace("\n", " ").replace("\t", " ").strip().lower().split())
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def whole_number(value: Any, path: str, key: str, what: str) -> int | str:
    """An id as the file gives it (a number, or digits in a string), or an AnnotationError naming the key:
    COCO file names are built from it and answers are looked up by it."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise AnnotationError(path, f"{value!r} is not a whole number ({what})", key=key)
    return value


def answer_score(count: int) -> float:
    return round(min(1.0, 0.3 * count), 1)


def soft_scores(answers: list[str]) -> dict[str, float]:
    counts = Counter(normalize_answer(answer) for answer in answers)
    counts.pop("", None)
    return {answer: answer_score(count) for answer, count in sorted(counts.items())}


class VQAv2(RawDataset):
    name = "vqav2"
    splits = tuple(VQA_SPLITS)
    default_split = "train"
    layout = """
ROOT/v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
ROOT/v2_mscoco_{train2014,val2014}_annotations.json           (test splits have none)
ROOT/{train2014,val2014,test2015}/COCO_{folder}_{image_id:012d}.jpg
Writes OUT/answer_vocab.json: normalised multiple-choice answers seen >= --min-answer-count times in the
train+val annotations found, most frequent first.
"""

    reader_options = (
        ReaderOption("questions", "the split's questions JSON (default: see the layout)"),
        ReaderOption("annotations", "the split's annotations JSON (default: see the layout)"),
        ReaderOption("images", "the split's image folder (default ROOT/train2014 etc.)"),
        ReaderOption("vocab_annotations", "annotation files the answer vocabulary counts (default: train and val "
                                          "found in ROOT)", kind="paths"),
        ReaderOption("min_answer_count", "answers seen fewer times are left out (default 9)", kind="count"),
    )

    def _annotation_path(self, stem: str) -> str:
        return os.path.join(self.root, f"v2_mscoco_{stem}_annotations.json")

    def items(self) -> Iterator[Item]:
        question_stem, annotation_stem, image_folder = VQA_SPLITS[self.split]
        questions_path = self.find_file("questions", [f"v2_OpenEnded_mscoco_{question_stem}_questions.json"],
                                        f"VQAv2 {self.split} questions")
        questions = require_list(require(load_json(questions_path), "questions", questions_path),
                                 questions_path, "questions")
        answers_by_question = {}
        if annotation_stem is not None:
            annotations_path = self.find_file("annotations", [f"v2_mscoco_{annotation_stem}_annotations.json"],
                                              f"VQAv2 {self.split} annotations")
            for position, annotation in enumerate(self._annotations(annotations_path)):
                answers = require_list(require(annotation, "answers", annotations_path,
                                               context=f" of annotations[{position}]"), annotations_path,
                                       f"annotations[{position}].answers")
                answers_by_question[annotation["question_id"]] = [
                    require(a, "answer", annotations_path, context=f" of annotations[{position}].answers") for a in answers]
        folder = self.option("images", os.path.join(self.root, image_folder))
        by_image: dict[int, list[dict]] = defaultdict(list)
        for position, question in enumerate(questions):
            context = f" of questions[{position}]"
            image_id = whole_number(require(question, "image_id", questions_path, context=context), questions_path,
                                    f"questions[{position}].image_id", "a COCO image id")
            question_id = whole_number(require(question, "question_id", questions_path, context=context),
                                       questions_path, f"questions[{position}].question_id", "a question id")
            entry = {"question_id": question_id, "question": require(question, "question", questions_path, context=context)}
            if annotation_stem is not None:
                if question_id not in answers_by_question:
                    raise AnnotationError(annotations_path, f"no annotation for question_id {question_id}; the "
                                          "questions and annotations files do not belong together", key="annotations")
                entry["answers"] = soft_scores(answers_by_question[question_id])
            by_image[image_id].append(entry)
        for image_id, image_questions in by_image.items():
            filename = f"COCO_{image_folder}_{int(image_id):012d}.jpg"
            yield Item(key=sample_key(self.name, image_folder, image_id), image=ImageSource(os.path.join(folder, filename)),
                       meta={"image_id": image_id, "captions": [], "questions": image_questions})

    def _annotations(self, path: str) -> list[dict]:
        annotations = require_list(require(load_json(path), "annotations", path), path, "annotations")
        for position, annotation in enumerate(annotations):
            whole_number(require(annotation, "question_id", path, context=f" of annotations[{position}]"), path,
                         f"annotations[{position}].question_id", "a question id")
        return annotations

    def answer_vocabulary(self) -> list[str]:
        paths = self.option("vocab_annotations") or [
            p for p in (self._annotation_path("train2014"), self._annotation_path("val2014")) if os.path.exists(p)]
        counts: Counter = Counter()
        for path in paths:
            for position, annotation in enumerate(self._annotations(path)):
                answer = require(annotation, "multiple_choice_answer", path, context=f" of annotations[{position}]")
                counts[normalize_answer(answer)] += 1
        counts.pop("", None)
        minimum = self.option("min_answer_count", 9)
        return [answer for answer, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if count >= minimum]

    def extra_files(self) -> dict[str, list[str]]:
        vocabulary = self.answer_vocabulary()
        return {VOCAB_FILE: vocabulary} if vocabulary else {}
