"""VQAv2: one sample per COCO image holding all its questions, each with soft-scored answers.

Answers are normalised and scored as the released code does (vqa_answers.py): an answer given by k of the 10
annotators scores 0, .3, .6, .9, 1 for k = 0..4+, and every answer of a question is kept in the metadata (the
training task drops the questions none of whose answers is a class; evaluation keeps them all). The answer
vocabulary is the released one: the normalised `multiple_choice_answer` of every train question, then every
val question, kept when seen at least --min-answer-count (9) times, in order of first appearance: 3129
answers, row for row the released VQA head's classes.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Iterator

from managertower.data.formats.base import (AnnotationError, Item, RawDataset, ReaderOption, load_json, require,
                                            require_list, sample_key)
from managertower.data.formats import vqa_answers
from managertower.data.formats.vqa_answers import normalize_answer, soft_scores  # noqa: F401 (this reader's API)
from managertower.data.images import ImageSource

# split -> (questions file stem, annotations file stem or None, image folder = COCO file-name prefix)
VQA_SPLITS = {
    "train": ("train2014", "train2014", "train2014"),
    "val": ("val2014", "val2014", "val2014"),
    "test": ("test2015", None, "test2015"),
    "test-dev": ("test-dev2015", None, "test2015"),
}
VOCAB_FILE = "answer_vocab.json"

def whole_number(value: Any, path: str, key: str, what: str) -> int | str:
    """An id as the file gives it (a number, or digits in a string), or an AnnotationError naming the key:
    COCO file names are built from it and answers are looked up by it."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise AnnotationError(path, f"{value!r} is not a whole number ({what})", key=key)
    return value


class VQAv2(RawDataset):
    name = "vqav2"
    splits = tuple(VQA_SPLITS)
    default_split = "train"
    layout = """
ROOT/v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
ROOT/v2_mscoco_{train2014,val2014}_annotations.json           (test splits have none)
ROOT/{train2014,val2014,test2015}/COCO_{folder}_{image_id:012d}.jpg
Writes OUT/answer_vocab.json: normalised multiple-choice answers seen >= --min-answer-count times in the
train then val annotations found, in order of first appearance (the released VQA head's class order).
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

    def vocabulary_files(self) -> list[str]:
        """The annotation files the vocabulary counts, in order: train before val, as the released code."""
        return self.option("vocab_annotations") or [
            p for p in (self._annotation_path("train2014"), self._annotation_path("val2014")) if os.path.exists(p)]

    def answer_vocabulary(self) -> list[str]:
        """The answer classes (vqa_answers.answer_vocabulary), counted once per reader: the train annotations
        alone are hundreds of MB."""
        if getattr(self, "_vocabulary", None) is None:
            multiple_choice = [require(annotation, "multiple_choice_answer", path,
                                       context=f" of annotations[{position}]")
                               for path in self.vocabulary_files()
                               for position, annotation in enumerate(self._annotations(path))]
            self._vocabulary = vqa_answers.answer_vocabulary(multiple_choice, self.option("min_answer_count", 9))
        return self._vocabulary

    def extra_files(self) -> dict[str, list[str]]:
        vocabulary = self.answer_vocabulary()
        return {VOCAB_FILE: vocabulary} if vocabulary else {}

    def notes(self) -> dict[str, object]:
        """What the summary and the run manifest report about answer_vocab.json."""
        return {"answer_vocab_size": len(self.answer_vocabulary()),
                "answer_vocab_min_count": self.option("min_answer_count", 9),
                "answer_vocab_from": [os.path.basename(path) for path in self.vocabulary_files()]}
