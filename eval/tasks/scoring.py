"""Scoring one task sample (docs/tasks.md, Scorings) and summarising a cell's samples.

teacher_forced: the prompt followed by the target is one window (one forward, or one stream
under the kv protocol), split where the sample's context ends (eval.tasks.cell); exact_match =
every target token is the argmax of its prediction (so greedy decoding would emit the target
as its first tokens), answer_nll = the target tokens' NLL; the window's NLL over the
predictions the protocol returns is kept too (the prompt's perplexity).
generated: greedy decoding of up to max_new_tokens after the prompt (the protocol's own
generate, the same split; cut at the end-of-text token and at the first line break after the
answer begins); a synthetic sample scores the share of its answers found in the output
(RULER's string match), a local-file sample the best --task-metric against its answers
(LongBench).
"""
import collections
import re
import string

import numpy as np
import torch
import torch.nn.functional as F

from ..logits import predictions
from ..statistics import wilson_interval

DEPTH_BINS = 5  # by_depth: accuracy per fifth of the context


def teacher_forced(model, sample, device, context_length=None, defer=False) -> dict:
    """The sample's window in one forward under the active attention, split at
    context_length (cabattn.protocol). The window's NLL is over the predictions the protocol
    returned: all of them, or from its context's last position on (`window_first`). defer:
    eval.logits.predictions'."""
    ids = torch.tensor([sample.ids], device=device)
    split = {} if context_length is None else {"context_length": context_length}
    prompt, target = len(sample.prompt_ids), ids[0, len(sample.prompt_ids):]
    scores = predictions(model, ids, defer=defer, **split)
    answer = slice(prompt - 1 - scores.first, None)
    return {"score": float(bool((scores.argmax[0, answer] == target).all())),
            "answer_nll": float(scores.nll[0, answer].sum()),
            "answer_tokens": int(target.numel()), "window_nll": float(scores.nll[0].sum()),
            "window_predictions": int(scores.nll.shape[1]), "window_first": scores.first}


def generated(sample, new_ids: list, tokenizer, metric=None) -> dict:
    """The score of a sample's greedy output (new_ids: the tokens after the prompt)."""
    if tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[:new_ids.index(tokenizer.eos_token_id)]
    output = tokenizer.decode(new_ids).lstrip("\n").split("\n")[0]
    target = sample.target_ids
    if metric is None:  # synthetic: the share of the answers the output names
        score = sum(answer in output for answer in sample.answers) / len(sample.answers)
    else:
        score = max(METRIC_FUNCTIONS[metric](output, answer) for answer in sample.answers)
    return {"score": float(score), "output": output,
            "starts_with_target": list(new_ids[:len(target)]) == list(target)}


# -- LongBench's answer metrics --------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's and LongBench's)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def f1(prediction: str, answer: str) -> float:
    """Token F1 of the normalised words (LongBench's qa_f1_score)."""
    predicted, truth = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((collections.Counter(predicted) & collections.Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, answer: str) -> float:
    """ROUGE-L F1: the longest common subsequence of the words (LongBench's rouge_score,
    which is the `rouge` package's rouge-l f with beta 1)."""
    a, b = prediction.lower().split(), answer.lower().split()
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(previous[j] + 1 if x == y else max(previous[j + 1], row[j]))
        previous = row
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


METRIC_FUNCTIONS = {"exact_match": exact_match, "f1": f1, "rouge_l": rouge_l}


# -- a cell's summary -------------------------------------------------------------------------

def accuracy_interval(scores: list, seed: int) -> tuple:
    """(95% interval of the mean score, how): Wilson's for 0/1 scores, else a percentile
    bootstrap over samples (fractional scores: shares of answers, F1, ROUGE-L)."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isin(scores, (0.0, 1.0)).all():
        return wilson_interval(int(scores.sum()), len(scores)), "wilson"
    means = scores[np.random.default_rng(seed).integers(0, len(scores), (1000, len(scores)))]
    low, high = np.percentile(means.mean(axis=1), [2.5, 97.5])
    return [float(low), float(high)], "bootstrap"


def by_depth(records: list) -> dict:
    """Accuracy per depth bin (fifths of the context, keyed by their centre)."""
    bins = collections.defaultdict(list)
    for record in records:
        if record["depth"] is not None:
            index = min(int(record["depth"] * DEPTH_BINS), DEPTH_BINS - 1)
            bins[f"{(index + 0.5) / DEPTH_BINS:.1f}"].append(record["score"])
    return {depth: {"accuracy": float(np.mean(scores)), "samples": len(scores)}
            for depth, scores in sorted(bins.items())}


def summarize(records: list, seed: int) -> dict:
    scores = [r["score"] for r in records]
    interval, how = accuracy_interval(scores, seed)
    summary = {"accuracy": float(np.mean(scores)), "accuracy_ci95": interval,
               "accuracy_ci_method": how, "samples": len(records),
               "answer_nll": None, "by_depth": by_depth(records)}
    if "answer_nll" in records[0]:
        answer_tokens = sum(r["answer_tokens"] for r in records)
        predictions = sum(r["window_predictions"] for r in records)
        summary["answer_nll"] = sum(r["answer_nll"] for r in records) / answer_tokens
        summary["perplexity"] = float(np.exp(sum(r["window_nll"] for r in records)
                                             / predictions))
    return summary
