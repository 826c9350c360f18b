"""Local task files in LongBench's fields (docs/tasks.md, Task files): one JSON object a line
with `context`, `input` (the question), `answers` (a non-empty list of non-empty strings) and
optionally `all_classes` (a list of strings or null). The prompt is the context, a blank line,
the question and "Answer:", behind the BOS token when the model's tokenizer puts one before a
text; a context too long for L is cut in the middle (LongBench's truncation) so that the
prompt and max_new_tokens fit in L tokens. Samples are generated and scored by --task-metric
against every answer (the best counts)."""
import json
from pathlib import Path

from .registry import Sample, TaskError, TaskSamples

FIELDS = ("context", "input", "answers")


def file_task_name(path) -> str:
    return Path(path).stem


def read_task_file(path) -> list:
    """The records of a task file; TaskError naming the file, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} does not exist")
    if path.suffix.lower() != ".jsonl":
        raise TaskError(f"task file {str(path)!r} must be JSON lines (.jsonl) in LongBench's "
                        f"fields: {', '.join(FIELDS)}, optional all_classes")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"task file {path}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise TaskError(f"{where} is not JSON: {err}") from None
        if not isinstance(record, dict):
            raise TaskError(f"{where} is not a JSON object")
        missing = [name for name in FIELDS if name not in record]
        if missing:
            raise TaskError(f"{where} lacks {', '.join(missing)}; every line needs "
                            f"{', '.join(FIELDS)} (optional all_classes)")
        for name in ("context", "input"):
            if not isinstance(record[name], str):
                raise TaskError(f"{where}: {name} must be a string")
        answers = record["answers"]
        if not isinstance(answers, list) or not answers or not all(
                isinstance(a, str) and a.strip() for a in answers):
            raise TaskError(f"{where}: answers must be a non-empty list of non-empty strings, "
                            f"got {answers!r}")
        classes = record.get("all_classes")
        if classes is not None and not (isinstance(classes, list)
                                        and all(isinstance(c, str) for c in classes)):
            raise TaskError(f"{where}: all_classes must be a list of strings or null")
        records.append(record)
    if not records:
        raise TaskError(f"task file {path} has no records")
    return records


def file_samples(path, tokenizer, length: int, count: int, max_new_tokens: int) -> TaskSamples:
    """The first `count` records of a task file as samples whose prompt leaves room for
    max_new_tokens in L."""
    from .prompt import PromptBuilder
    builder = PromptBuilder(tokenizer)
    samples = []
    for record in read_task_file(path)[:count]:
        question = builder.encode("\n\n" + record["input"].strip() + "\nAnswer:")
        context = builder.encode(record["context"])
        room = length - max_new_tokens - len(builder.bos) - len(question)
        if room < 1:
            raise TaskError(f"task file {path}: a question takes {len(question)} tokens; with "
                            f"{max_new_tokens} new tokens it does not fit in L = {length}")
        if len(context) > room:  # keep the beginning and the end (LongBench)
            context = context[:room // 2] + context[len(context) - (room - room // 2):]
        before_question = builder.bos + context
        samples.append(Sample(prompt_ids=before_question + question,
                              target_ids=builder.target_ids("Answer:", " " + record["answers"][0]),
                              answers=list(record["answers"]),
                              question_start=len(before_question),
                              all_classes=record.get("all_classes")))
    name = file_task_name(path)
    return TaskSamples(task=name, context_length=length, samples=samples,
                       description=f"{name}: local task file {path}",
                       info={"num_samples": len(samples), "file": str(path)})
