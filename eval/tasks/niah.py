"""The needle-in-a-haystack family of RULER (Hsieh et al. 2024; docs/tasks.md): needles "One
of the special magic numbers for {word} is: {7 digits}." and a question about one key or
several. The measured needle (the first asked) sits at the sample's depth; the others at
uniform random depths."""
from .registry import Layout, other_depths, random_number, task

INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to "
               "memorize it. I will quiz you about the numbers afterwards.")


def needle(word: str, number: str) -> str:
    return f"One of the special magic numbers for {word} is: {number}."


def question(words: list, plural: bool = False) -> str:
    if not plural:
        about = words[0]
        return (f"What is the special magic number for {about} mentioned in the provided text? "
                f"The special magic number for {about} mentioned in the provided text is")
    about = words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" and {words[-1]}"
    return (f"What are all the special magic numbers for {about} mentioned in the provided "
            f"text? The special magic numbers for {about} mentioned in the provided text are")


def in_order(pairs: list) -> list:
    """(depth, ...) pairs as they appear in the context (by depth; ties keep their order)."""
    return sorted(pairs, key=lambda pair: pair[0])


@task("niah_single", "one needle; its number is asked for")
def niah_single(rng, words, depth) -> Layout:
    word, number = str(rng.choice(words)), random_number(rng, 7)
    return Layout(INSTRUCTION, [(depth, needle(word, number))], question([word]), [number],
                  f" {number}", depth)


@task("niah_multikey", "the asked needle among 3 distractor needles with other keys")
def niah_multikey(rng, words, depth) -> Layout:
    keys = [str(w) for w in rng.choice(words, size=4, replace=False)]
    numbers = [random_number(rng, 7) for _ in keys]
    depths = [depth] + other_depths(rng, 3)
    return Layout(INSTRUCTION, [(d, needle(k, n)) for d, k, n in zip(depths, keys, numbers)],
                  question(keys[:1]), numbers[:1], f" {numbers[0]}", depth)


@task("niah_multivalue", "4 needles with the same key; all 4 numbers are asked for",
      multi_answer=True)
def niah_multivalue(rng, words, depth) -> Layout:
    word = str(rng.choice(words))
    numbers = [random_number(rng, 7) for _ in range(4)]
    placed = in_order(list(zip([depth] + other_depths(rng, 3), numbers)))
    answers = [n for _, n in placed]
    return Layout(INSTRUCTION, [(d, needle(word, n)) for d, n in placed],
                  question([word], plural=True),
                  answers, " " + ", ".join(answers), depth)


@task("niah_multiquery", "4 needles with different keys; all 4 are asked for",
      multi_answer=True)
def niah_multiquery(rng, words, depth) -> Layout:
    keys = [str(w) for w in rng.choice(words, size=4, replace=False)]
    numbers = [random_number(rng, 7) for _ in keys]
    placed = in_order(list(zip([depth] + other_depths(rng, 3), keys, numbers)))
    asked = [k for _, k, _ in placed]
    answers = [n for _, _, n in placed]
    return Layout(INSTRUCTION, [(d, needle(k, n)) for d, k, n in placed],
                  question(asked, plural=True),
                  answers, " " + ", ".join(answers), depth)
