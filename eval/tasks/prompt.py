"""Token-exact prompts (docs/tasks.md, Prompt building): a task's layout placed into a haystack
so that the teacher-forced window (instruction, context, question, target) is exactly L tokens
of the model's tokenizer.

Pieces are tokenised separately and their ids concatenated (the model reads ids, never a
re-tokenised string): the BOS token when the tokenizer puts one before a text (Gemma's, as in
the perplexity windows), the instruction and a newline, the haystack cut to the room left, each
needle (with a leading space) inserted at the sentence end nearest its depth, a newline and the
question, then the target as the tokenizer writes it after the question. Haystacks: `noise`,
RULER's repeated filler sentences; `text`, consecutive text of the offline pd-books corpus (one
window per sample, evenly spaced over the corpus, eval.data)."""
import functools
import re
import zlib
from pathlib import Path

import numpy as np

from .registry import TASKS, Sample, TaskError, TaskSamples

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
         "again.")
TEXT_CORPUS = "pd-books"
WORDS_FILE = Path(__file__).with_name("words.txt")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$|\n\s*$")


def _read_words() -> np.ndarray:
    """The keys and list words (eval/tasks/words.txt): real English words, sorted."""
    lines = WORDS_FILE.read_text().splitlines()
    return np.array(sorted(w for w in lines if w and not w.startswith("#")))


WORDS = _read_words()


def depths(count: int) -> list:
    """The measured needle's depth of each of `count` samples: evenly spread over [0, 1]
    (the midpoints of `count` equal parts)."""
    return [(i + 0.5) / count for i in range(count)]


class PromptBuilder:
    """Builds samples with one tokenizer (which of its tokens end a sentence is cached)."""

    def __init__(self, tokenizer):
        from ..data import leading_bos
        self.tokenizer = tokenizer
        bos = leading_bos(tokenizer)
        self.bos = [] if bos is None else [bos]  # what every prompt starts with

    def encode(self, text: str) -> list:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @functools.cached_property
    def _pieces(self) -> list:
        return self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])

    @functools.cached_property
    def sentence_end(self) -> np.ndarray:
        """Per token id: does its text end a sentence (or a line)?"""
        return np.array([bool(_SENTENCE_END.search(p)) for p in self._pieces])

    def target_ids(self, question: str, target: str) -> list:
        """The ids of target as the tokenizer writes it right after question."""
        alone = self.encode(question)
        joint = self.encode(question + target)
        if joint[:len(alone)] != alone:
            return self.encode(target)  # a token spans the boundary: the target on its own
        return joint[len(alone):]

    def build(self, layout, haystack: np.ndarray, length: int, task: str) -> Sample:
        """The sample whose window (prompt + target) is `length` tokens (at most, for a layout
        that fills its own context); TaskError when the fixed parts do not fit."""
        instruction = self.encode(layout.instruction + "\n")
        question = self.encode("\n" + layout.question)
        target = self.target_ids("\n" + layout.question, layout.target)
        room = length - len(self.bos) - len(instruction) - len(question) - len(target)
        if layout.fill is not None:
            try:
                context = self.encode(layout.fill(room, lambda text: len(self.encode(text))))
            except ValueError as err:
                raise TaskError(f"task {task!r} does not fit in L = {length} tokens: {err}") \
                    from None
        else:
            needles = [(d, self.encode(" " + text))
                       for d, text in sorted(layout.needles, key=lambda n: n[0])]
            room_left = room - sum(len(ids) for _, ids in needles)
            if room_left < 1:
                raise TaskError(
                    f"task {task!r} does not fit in L = {length} tokens: its "
                    f"{'BOS, ' if self.bos else ''}instruction, needles, question and answer "
                    f"take {length - room_left} tokens; give a context length of at least "
                    f"{length - room_left + 1}")
            if len(haystack) < room_left:
                raise TaskError(f"the haystack has {len(haystack)} tokens, {room_left} needed")
            context = self.place(needles, np.asarray(haystack[:room_left]).tolist())
        before_question = self.bos + instruction + context
        return Sample(prompt_ids=before_question + question, target_ids=target,
                      answers=list(layout.answers), question_start=len(before_question),
                      depth=layout.depth)

    def place(self, needles: list, hay: list) -> list:
        """hay with each (depth, ids) needle inserted at the sentence end nearest to its
        depth, in depth order."""
        ends = self.sentence_end[np.asarray(hay[:-1], dtype=np.int64)] if len(hay) > 1 else []
        bounds = np.concatenate([[0], np.flatnonzero(ends) + 1, [len(hay)]])
        context, previous = [], 0
        for depth, ids in needles:
            candidates = bounds[bounds >= previous]
            at = int(candidates[np.argmin(np.abs(candidates - depth * len(hay)))])
            context += hay[previous:at] + ids
            previous = at
        return context + hay[previous:]

    # -- haystacks ------------------------------------------------------------------------
    def noise(self, length: int) -> np.ndarray:
        unit = self.encode(" " + NOISE)
        return np.array(unit * (length // len(unit) + 1))

    def haystacks(self, kind: str, length: int, count: int, cache_dir=None) -> list:
        """`count` haystacks of at least `length` tokens."""
        if kind == "noise":
            return [self.noise(length)] * count
        if kind == "text":
            from ..data import load_windows
            windows = load_windows(TEXT_CORPUS, self.tokenizer, length, max_windows=count,
                                   cache_dir=cache_dir)
            # Text only: a window's BOS would land inside the prompt, which has its own.
            text = windows.input_ids.numpy()[:, int(windows.bos_token_id is not None):]
            return [text[i % len(text)] for i in range(count)]
        raise TaskError(f"unknown haystack {kind!r}; valid: text, noise")


def sample_rng(seed: int, task: str, length: int, index: int):
    """The generator of one sample: the same (seed, task, L, index) gives the same sample."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index])


def synthetic_samples(task: str, tokenizer, length: int, count: int, seed: int,
                      haystack: str = "text", cache_dir=None,
                      builder: PromptBuilder = None) -> TaskSamples:
    """The `count` samples of a synthetic task at context length `length`."""
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    entry = TASKS[task]
    builder = builder or PromptBuilder(tokenizer)
    hays = builder.haystacks(haystack, length, count, cache_dir)
    samples = [builder.build(entry.layout(sample_rng(seed, task, length, i), WORDS, d),
                             hays[i], length, task)
               for i, d in enumerate(depths(count))]
    where = "a numbered word list" if task == "common_words" else (
        f"{haystack} haystack" + (f" ({TEXT_CORPUS})" if haystack == "text" else ""))
    return TaskSamples(task=task, context_length=length, samples=samples,
                       description=f"{task}: {entry.description}; {where}",
                       info={"num_samples": count, "haystack": haystack,
                             "description": entry.description})
