"""The synthetic task generators (docs/tasks.md) without a model: every sample's window fills
L tokens of the default model's tokenizer, seeds reproduce, every answer can be read back from
the context alone, by parsing it as a reader would, and prompts (also of task files) start with
the BOS token exactly when the tokenizer puts one before a text, and say where the question
starts."""
import collections
import copy
import json
import re

import pytest

from eval import models
from eval.tasks import TASKS, TaskError
from eval.tasks.longbench import file_samples
from eval.tasks.prompt import WORDS, PromptBuilder, depths, sample_rng, synthetic_samples


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(models.load_tokenizer())


@pytest.fixture(scope="module")
def bos_builder(builder):
    """With SmolLM2's tokenizer made to put its BOS token (id 1) first, as Gemma's does."""
    tokenizer = copy.deepcopy(builder.tokenizer)
    tokenizer.add_bos_token = True
    return PromptBuilder(tokenizer)


def generate(builder, task, length=1024, count=5, seed=42, haystack="noise"):
    return synthetic_samples(task, builder.tokenizer, length, count, seed, haystack,
                             builder=builder)


def asked_words(question: str) -> list:
    about = re.search(r"numbers? for (.+?) mentioned in the provided text\?", question)[1]
    return re.split(r", | and ", about)


def recover(task: str, text: str) -> list:
    """The answers as a reader finds them in the decoded prompt."""
    context, question = text.rsplit("\n", 1)
    if task == "passkey":
        keys = re.findall(r"The pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.",
                          context)
        assert len(keys) == 1 and keys[0][0] == keys[0][1]
        return [keys[0][0]]
    if task.startswith("niah"):
        numbers = collections.defaultdict(list)
        for word, number in re.findall(r"One of the special magic numbers for (\w+) is: (\d{7})\.",
                                       context):
            numbers[word].append(number)
        return [n for word in asked_words(question) for n in numbers[word]]
    if task == "variable_tracking":
        value = re.search(r"assigned the value (\d{5}) in the text above", question)[1]
        holds = {name for name, v in re.findall(r"VAR ([A-Z]{5}) = (\d{5})\.", context)
                 if v == value}
        for name, source in re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", context):
            if source in holds:  # the chain is laid out in order
                holds.add(name)
        return sorted(holds)
    if task == "common_words":
        counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", context)).most_common()
        assert counts[9][1] > counts[10][1], "the 10 common words must stand out"
        return sorted(word for word, _ in counts[:10])
    raise AssertionError(task)


@pytest.mark.parametrize("haystack", ["noise", "text"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_recoverable_and_lengths_fit(builder, task, haystack):
    tok = builder.tokenizer
    for length in (512, 2048):
        made = generate(builder, task, length=length, haystack=haystack)
        assert len(made.samples) == 5
        for sample in made.samples:
            if task == "common_words":  # the list is sized in whole entries
                assert length - 12 <= len(sample.ids) <= length
            else:
                assert len(sample.ids) == length
            text = tok.decode(sample.prompt_ids)
            found = recover(task, text)
            expected = sorted(sample.answers) if task in ("variable_tracking",
                                                          "common_words") else sample.answers
            assert found == expected, (task, length, text[-300:])
            # the teacher-forced target is the answers as the question asks for them
            target = tok.decode(sample.target_ids)
            assert all(answer in target for answer in sample.answers)
            assert tok.decode(sample.ids).endswith(target)


@pytest.mark.parametrize("task", ["passkey", "niah_single", "variable_tracking"])
def test_needle_sits_at_its_depth(builder, task):
    made = generate(builder, task, length=2048, count=5, haystack="text")
    for sample in made.samples:
        first = {"passkey": "The pass key is", "niah_single": "One of the special magic",
                 "variable_tracking": f"VAR {sample.answers[0]} = "}[task]
        text = builder.tokenizer.decode(sample.prompt_ids)
        context = text.split("\n", 1)[1].rsplit("\n", 1)[0]
        assert abs(context.index(first) / len(context) - sample.depth) < 0.05
    assert [s.depth for s in made.samples] == [0.1, 0.3, 0.5, 0.7, 0.9]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_seeds_reproduce(builder, task):
    a = generate(builder, task, count=3, seed=7, haystack="text")
    b = generate(builder, task, count=3, seed=7, haystack="text")
    c = generate(builder, task, count=3, seed=8, haystack="text")
    assert [s.ids for s in a.samples] == [s.ids for s in b.samples]
    assert [s.ids for s in a.samples] != [s.ids for s in c.samples]
    # samples within one run differ from each other
    assert len({tuple(s.answers) for s in a.samples}) == 3


def test_too_short_context_names_the_minimum(builder):
    with pytest.raises(TaskError, match=r"does not fit in L = 64 tokens.*at least \d+"):
        generate(builder, "niah_multiquery", length=64)
    with pytest.raises(TaskError, match="unknown task 'passkee'; valid tasks: .*passkey"):
        generate(builder, "passkee")


@pytest.mark.parametrize("haystack", ["noise", "text"])
@pytest.mark.parametrize("task", ["passkey", "niah_multikey", "common_words"])
def test_prompts_start_with_bos_and_know_where_the_question_starts(builder, bos_builder, task,
                                                                    haystack):
    length, count = 512, 3
    for made_by, bos in ((builder, []), (bos_builder, [1])):
        made = generate(made_by, task, length=length, count=count, haystack=haystack)
        for index, (sample, depth) in enumerate(zip(made.samples, depths(count))):
            layout = TASKS[task].layout(sample_rng(42, task, length, index), WORDS, depth)
            assert sample.prompt_ids[:len(bos)] == bos
            assert sample.ids.count(1) == len(bos)  # no BOS inside (the text haystack's)
            if task != "common_words":
                assert len(sample.ids) == length  # the BOS takes a context token
            question = sample.prompt_ids[sample.question_start:]
            assert question == made_by.encode("\n" + layout.question)
            instruction = made_by.encode(layout.instruction + "\n")
            assert sample.prompt_ids[len(bos):len(bos) + len(instruction)] == instruction


def test_task_file_prompts_start_with_bos_and_know_where_the_question_starts(
        builder, bos_builder, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"context": "The river ran by the city. " * 200,
                                "input": "What ran by the city?", "answers": ["the river"]}))
    for made_by, bos in ((builder, []), (bos_builder, [1])):
        sample, = file_samples(path, made_by.tokenizer, 256, 1, max_new_tokens=8).samples
        assert sample.prompt_ids[:len(bos)] == bos and sample.prompt_ids.count(1) == len(bos)
        assert len(sample.prompt_ids) == 256 - 8  # the context cut to leave the new tokens
        question = sample.prompt_ids[sample.question_start:]
        assert question == made_by.encode("\n\nWhat ran by the city?\nAnswer:")
