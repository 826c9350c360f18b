"""passkey (docs/tasks.md): a 5-digit key hidden in a haystack, asked for at the end."""
from .registry import Layout, random_number, task


@task("passkey", "a 5-digit pass key hidden in the haystack (Mohtashami and Jaggi 2023)")
def passkey(rng, words, depth) -> Layout:
    key = random_number(rng, 5)
    return Layout(
        instruction="There is an important info hidden inside a lot of irrelevant text. Find it "
                    "and memorize it. I will quiz you about the important information there.",
        needles=[(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
        question="What is the pass key? The pass key is", answers=[key], target=f" {key}",
        depth=depth)
