"""common_words (RULER's common words extraction; docs/tasks.md): a numbered list of words in
which 10 words appear much more often than the rest; the 10 are the answer. The list is the
whole context (no haystack) and is sized to the context length: each common word appears
max(4, room / 150) times, each other word twice. The target lists the 10 alphabetically (no
order is implied by the question, so teacher-forced exact match is a lower bound here; the
generated score, the share of the 10 named, is the task's measure)."""
import math

import numpy as np

from .registry import Layout, task

COMMON = 10
RARE_COUNT = 2


def numbered(words) -> str:
    return "".join(f" {i}. {w}" for i, w in enumerate(words, 1))


@task("common_words", "a word list in which 10 words are frequent; all 10 are asked for",
      multi_answer=True)
def common_words(rng, words, depth) -> Layout:
    chosen = [str(w) for w in rng.permutation(words)]
    common, rare = chosen[:COMMON], chosen[COMMON:]
    order_seed = int(rng.integers(2 ** 32))

    def word_list(pairs: int, each: int) -> str:
        entries = common * each + rare[:pairs] * RARE_COUNT
        return numbered(np.random.default_rng(order_seed).permutation(entries))

    def fill(room: int, count) -> str:
        each = max(4, room // 150)
        if count(word_list(0, each)) > room:
            raise ValueError(f"common_words needs more than {room} tokens of context")
        per_entry = count(word_list(0, each)) / (COMMON * each)
        pairs = min(len(rare), max(0, int((room / per_entry - COMMON * each) / RARE_COUNT)))
        while pairs > 0 and count(word_list(pairs, each)) > room:
            over = count(word_list(pairs, each)) - room
            pairs -= max(1, math.ceil(over / (RARE_COUNT * per_entry)))
        pairs = max(pairs, 0)
        while pairs < len(rare) and count(word_list(pairs + 1, each)) <= room:
            pairs += 1
        return word_list(pairs, each)

    answers = sorted(common)
    return Layout(
        instruction="Below is a numbered list of words. In these words, some appear more often "
                    "than others. Memorize the ones that appear most often.",
        needles=[], fill=fill,
        question=f"Question: What are the {COMMON} most common words in the above list? Answer: "
                 f"The top {COMMON} words that appear most often in the list are:",
        answers=answers, target=" " + ", ".join(answers), depth=None)
