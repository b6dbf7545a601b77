"""What the two models are asked besides their training captions: the mini SLAKE's questions
reworded in ways the captions and the VQA files never use, and plain-text prompts that test the
LLM's own abilities (no image). Both sets are fixed here, so every run asks the same things."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from medcap.errors import MedcapError
from medcap.evaluation.vqa import first_word, normalize_answer


class RewordError(MedcapError, ValueError):
    """A question none of the fixed rewordings covers (the mini SLAKE's questions changed)."""


# (pattern on the original question, rewording); the first match is used
REWORDINGS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^What modality is used to take this image\?$"), "What kind of imaging produced this picture?"),
    (re.compile(r"^Which part of the body does this image show\?$"), "What region of the body can be seen in this picture?"),
    (re.compile(r"^In which plane is this image taken\?$"), "Along which plane was this picture sliced?"),
    (re.compile(r"^Is this (an?) (.+?) or (an?) (.+?)\?$"), r"Which of the two is this picture: \1 \2 or \3 \4?"),
    (re.compile(r"^Is this (an?) (.+?)\?$"), r"Would you say this picture is \1 \2?"),
]  # fmt: skip


def reword(question: str) -> str:
    """The fixed rewording of one mini-SLAKE question, or a RewordError naming it."""
    for pattern, replacement in REWORDINGS:
        if pattern.match(question.strip()):
            return pattern.sub(replacement, question.strip())
    raise RewordError(f"no fixed rewording for the question {question!r}: add one to medcap.claims.probes.REWORDINGS")


NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}  # fmt: skip


def _number(expected: int) -> Callable[[str], bool]:
    """The last number the reply states, in digits or words ("2 + 2 = 4", "A dog has four legs.")."""

    def check(reply: str) -> bool:
        found = re.findall(r"\d+|[a-z]+", reply.lower())
        numbers = [int(w) if w.isdigit() else NUMBER_WORDS[w] for w in found if w.isdigit() or w in NUMBER_WORDS]
        return bool(numbers) and numbers[-1] == expected

    return check


def _first_word(expected: str) -> Callable[[str], bool]:
    return lambda reply: first_word(reply) == expected


def _only_upper(word: str) -> Callable[[str], bool]:
    return lambda reply: re.sub(r"[^A-Za-z]", "", reply) == word


def _contains(text: str) -> Callable[[str], bool]:
    return lambda reply: text in normalize_answer(reply)


def _lowercase_with(word: str) -> Callable[[str], bool]:
    return lambda reply: reply.strip() == reply.strip().lower() and word in reply.lower()


@dataclass(frozen=True)
class TextPrompt:
    kind: str  # counting, yes/no fact, format
    prompt: str
    expected: str  # shown in the report
    check: Callable[[str], bool]


NUMBER = " Answer with a number only."
YES_NO = " Answer yes or no."
TEXT_PROMPTS: list[TextPrompt] = [
    TextPrompt("counting", "How many legs does a dog have?" + NUMBER, "4", _number(4)),
    TextPrompt("counting", "How many days are in a week?" + NUMBER, "7", _number(7)),
    TextPrompt("counting", "What is 2 + 2?" + NUMBER, "4", _number(4)),
    TextPrompt("counting", "What is 3 + 5?" + NUMBER, "8", _number(8)),
    TextPrompt("counting", "How many wheels does a bicycle have?" + NUMBER, "2", _number(2)),
    TextPrompt("counting", "How many months are in a year?" + NUMBER, "12", _number(12)),
    TextPrompt("counting", "What is 10 - 3?" + NUMBER, "7", _number(7)),
    TextPrompt("counting", "How many sides does a triangle have?" + NUMBER, "3", _number(3)),
    TextPrompt("counting", "How many hours are in a day?" + NUMBER, "24", _number(24)),
    TextPrompt("counting", "How many eyes does a person have?" + NUMBER, "2", _number(2)),
    TextPrompt("yes/no fact", "Is the sun a star?" + YES_NO, "yes", _first_word("yes")),
    TextPrompt("yes/no fact", "Can fish breathe underwater?" + YES_NO, "yes", _first_word("yes")),
    TextPrompt("yes/no fact", "Is Paris the capital of France?" + YES_NO, "yes", _first_word("yes")),
    TextPrompt("yes/no fact", "Is ice hot?" + YES_NO, "no", _first_word("no")),
    TextPrompt("yes/no fact", "Do cats bark?" + YES_NO, "no", _first_word("no")),
    TextPrompt("yes/no fact", "Is the Earth flat?" + YES_NO, "no", _first_word("no")),
    TextPrompt("yes/no fact", "Can humans fly without help?" + YES_NO, "no", _first_word("no")),
    TextPrompt("yes/no fact", "Is snow white?" + YES_NO, "yes", _first_word("yes")),
    TextPrompt("yes/no fact", "Do birds have feathers?" + YES_NO, "yes", _first_word("yes")),
    TextPrompt("yes/no fact", "Is 7 an even number?" + YES_NO, "no", _first_word("no")),
    TextPrompt("yes/no fact", "Is the Pacific an ocean?" + YES_NO, "yes", _first_word("yes")),
    TextPrompt("yes/no fact", "Do fish have fur?" + YES_NO, "no", _first_word("no")),
    TextPrompt("format", "Reply with only the word OK.", "OK", _first_word("ok")),
    TextPrompt("format", "Write the word hello in capital letters only.", "HELLO", _only_upper("HELLO")),
    TextPrompt("format", "What color is the sky on a clear day? Answer in one word.", "blue", _first_word("blue")),
    TextPrompt("format", "What is the capital of France? Answer in one word.", "Paris", _first_word("paris")),
    TextPrompt("format", "What color is grass? Answer in one word.", "green", _first_word("green")),
    TextPrompt("format", "Write the number five as a digit only.", "5", _number(5)),
    TextPrompt("format", "Repeat exactly: apple banana", "apple banana", _contains("apple banana")),
    TextPrompt("format", "Answer in lowercase letters only: which animal says meow?", "cat (lowercase)",
               _lowercase_with("cat")),  # fmt: skip
]
