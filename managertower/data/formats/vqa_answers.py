"""VQAv2 answers as the released code turns them into classes (ViLT, METER and ManagerTower share it).

    normalize_answer(text)              the VQA evaluation's answer normalisation, its quirks included
    answer_score(count)                 the soft score of an answer `count` of the 10 annotators gave
    soft_scores(answers)                one question's {normalised answer: score}, in order of first appearance
    answer_vocabulary(answers, 9)       the classes: normalised answers seen >= 9 times, in order of first appearance

The vocabulary is built from the `multiple_choice_answer` of every train question, then every val question,
in file order, and keeps the order in which each answer first appears (not sorted by frequency): row i of a
released VQA head is answer i of this list, so a released checkpoint's head loads one row per class.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

# --- the VQA evaluation's normalisation tables ------------------------------------------------------------

# Spellings of contractions, each written once in its full form. Annotators drop apostrophes, so a form with
# k apostrophes is matched by its k spellings that lack exactly one of them ("couldn't've" is reached from
# "couldnt've" and "couldn'tve"); the full form itself maps to nothing (it is already right). This is the
# evaluation's own table, regrouped: its "I'm", "I've", "I'd've" entries are capitalised and never match the
# lowercased words they are compared with, so "im" stays "im" here too; "lets", "shes", "its" are not in it.
_CONTRACTED_FORMS = """
    ain't aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't mightn't mustn't needn't
    oughtn't shan't shouldn't wasn't weren't won't wouldn't
    could've might've must've not've should've would've
    couldn't've hadn't've mightn't've shouldn't've wouldn't've
    he'd he'd've he's how'd how'll how's it'd it'd've it'll ma'am o'clock 'ow's'at she'd've 'twas
    somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
    something'd something'd've something'll
    that's there'd there'd've there're there's they'd they'd've they'll they're they've we'd've we've
    what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
    why'll why're why's y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _spellings_missing_one_apostrophe(form: str) -> list[str]:
    return [form[:i] + form[i + 1:] for i, char in enumerate(form) if char == "'"]


CONTRACTIONS: dict[str, str] = {spelling: form for form in _CONTRACTED_FORMS
                                for spelling in _spellings_missing_one_apostrophe(form)}
# The one entry of the evaluation's table that runs the other way: it removes the apostrophe.
CONTRACTIONS["somebody'd"] = "somebodyd"

NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
NUMBER_WORDS["none"] = "0"

ARTICLES = frozenset(("a", "an", "the"))

# Punctuation in the order the evaluation treats it (the order matters: see normalize_answer).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")  # "1,000": every mark is then deleted, not spaced
_FULL_STOP = re.compile(r"\.(?!\d)")  # a full stop not followed by a digit ("3.5" keeps its point)
# The evaluation passes re.UNICODE (32) where re.sub takes `count`: at most 32 full stops are removed.
_FULL_STOPS_REMOVED = 32


def normalize_answer(answer: str) -> str:
    """An answer as the VQA evaluation (and the released vocabulary) spells it: "Two" -> "2", "a dog" -> "dog",
    "isnt" -> "isn't", "yes." -> "yes", "1,000" -> "1000".

    Each punctuation mark is deleted when the answer AS GIVEN has it next to a space or holds a digit-comma-digit,
    and replaced by a space otherwise; the test always reads the original answer, never the text the earlier
    marks already changed ("x;-y-z" -> "x y z"). Then full stops not before a digit go, the text is lowercased and
    split on whitespace, number words become digits, articles are dropped and contractions get their apostrophes.
    """
    original = str(answer)
    delete_marks = _DIGIT_COMMA_DIGIT.search(original) is not None
    text = original
    for mark in PUNCTUATION:
        if delete_marks or mark + " " in original or " " + mark in original:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _FULL_STOP.sub("", text, count=_FULL_STOPS_REMOVED)
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


# --- scores and classes --------------------------------------------------------------------------------------

# The released dataprep's table: given by 0, 1, 2, 3, 4+ of the 10 annotators (the VQA accuracy
# min(1, k / 3) averaged over the annotator subsets, rounded to one decimal).
_SCORE_BY_COUNT = (0.0, 0.3, 0.6, 0.9)


def answer_score(count: int) -> float:
    """The soft score of an answer that `count` annotators gave: 0, 0.3, 0.6, 0.9, then 1.0 (exact values)."""
    return _SCORE_BY_COUNT[count] if count < len(_SCORE_BY_COUNT) else 1.0


def soft_scores(answers: Iterable[str]) -> dict[str, float]:
    """One question's annotator answers -> {normalised answer: soft score}, in order of first appearance. Every
    answer is kept, an empty normalised one ("a", "the") included, as the released dataprep keeps it: whether
    it is a class is the vocabulary's business."""
    counts = Counter(normalize_answer(answer) for answer in answers)
    return {answer: answer_score(count) for answer, count in counts.items()}


def answer_vocabulary(multiple_choice_answers: Iterable[str], min_count: int = 9) -> list[str]:
    """The answer classes: the normalised answers seen at least `min_count` times, in the order each first
    appears (train questions first, then val, as the caller passes them)."""
    counts = Counter(normalize_answer(answer) for answer in multiple_choice_answers)
    return [answer for answer, count in counts.items() if count >= min_count]
