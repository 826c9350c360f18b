"""variable_tracking (RULER; docs/tasks.md): a chain VAR X1 = {5 digits}. VAR X2 = VAR X1. ...
(4 variables) and a distractor chain with another value, hidden in order in the haystack; every
variable of the chain whose value is asked is the answer. The chain's first statement sits at
the sample's depth, the rest after it; the distractor chain at random depths."""
import string

from .registry import Layout, other_depths, random_number, task

CHAIN = 4


def chain(names: list, value: str) -> list:
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}."
                                              for a, b in zip(names, names[1:])]


@task("variable_tracking", "a chain of 4 variable assignments and a distractor chain; every "
      "variable holding the asked value", multi_answer=True)
def variable_tracking(rng, words, depth) -> Layout:
    letters = list(string.ascii_uppercase)
    names = []
    while len(names) < 2 * CHAIN:  # distinct 5-letter names
        name = "".join(rng.choice(letters, size=5))
        if name not in names:
            names.append(name)
    value = random_number(rng, 5)
    distractor = random_number(rng, 5)
    while distractor == value:
        distractor = random_number(rng, 5)
    asked, other = names[:CHAIN], names[CHAIN:]
    later = sorted(depth + (1 - depth) * d for d in other_depths(rng, CHAIN - 1))
    needles = list(zip([depth] + later, chain(asked, value)))
    needles += list(zip(sorted(other_depths(rng, CHAIN)), chain(other, distractor)))
    return Layout(
        instruction="Memorize and track the chain(s) of variable assignment hidden in the "
                    "following text.",
        needles=needles,
        question=f"Question: Find all variables that are assigned the value {value} in the text "
                 "above. Answer: According to the chain(s) of variable assignment in the text "
                 f"above, {CHAIN} variables are assigned the value {value}, they are:",
        answers=asked, target=" " + " ".join(asked), depth=depth)
