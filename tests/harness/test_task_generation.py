"""Greedy generation for tasks (docs/tasks.md, Scorings): decode-time eviction under the kv
protocol reproduces the teacher-forced stream token for token, the two scorings agree sample
by sample on single-answer tasks, the mask protocol's sparse prefill + dense decoding runs and
is recorded, and local LongBench-style files are generated and scored."""
import json

import pytest
import torch
from eval_assets import tiny_model, tiny_text  # noqa: F401

import cabattn
from eval import cell, models
from eval.config import ExperimentConfig, TaskConfig
from eval.tasks import scoring
from eval.tasks.cell import compute_task_cell
from eval.tasks.samples import TaskSpec, load_samples

pytestmark = pytest.mark.usefixtures("single_thread")


def config_for(model, L, tmp_path, protocol="kv", **tasks) -> ExperimentConfig:
    config = ExperimentConfig(name="gen", datasets=[], methods=["dense", "h2o"],
                              protocol=protocol, output_dir=str(tmp_path),
                              tasks=TaskConfig(**{"haystack": "noise", **tasks}))
    config.model.name, config.model.device = model, "cpu"
    config.context_length_sweep.context_lengths = [L]
    config.sparsity_sweep.enabled = False
    return config


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return models.load_model(str(tiny_model))


def test_kv_generation_is_the_teacher_forced_stream_of_its_output(tiny, tmp_path):
    """Teacher-forcing the prompt followed by the generated tokens (same budget) predicts
    exactly the generated tokens: generation evicts as the stream does, token by token."""
    config = config_for(tiny.name, 448, tmp_path, names=["niah_single"], samples=3)
    samples = load_samples(config, tiny.tokenizer, TaskSpec("niah_single", 448, "h2o", 0.5))
    new = 8
    for sample in samples.samples:
        prompt = torch.tensor([sample.prompt_ids])
        protocol = cabattn.KVProtocol(tiny.model, "h2o", 0.5, kv_chunk=1)
        with protocol:
            generated = protocol.generate(prompt, new)[0]
        window = torch.cat([prompt[0], generated])[None]
        with cabattn.apply(tiny.model, "h2o", 0.5, protocol="kv", kv_chunk=1), \
                torch.no_grad():
            logits = tiny.model(window).logits[0]
        assert protocol.budget < len(sample.prompt_ids)  # eviction did happen while decoding
        assert torch.equal(logits[len(sample.prompt_ids) - 1:-1].argmax(-1), generated)


@pytest.mark.parametrize("method, protocol", [("dense", "kv"), ("h2o", "kv"), ("h2o", "mask"),
                                              ("cab_v4", "mask"), ("snapkv", "prefill"),
                                              ("h2o", "prefill")])
def test_scorings_agree_sample_by_sample_on_the_default_model(method, protocol, tmp_path):
    """Single-answer tasks: teacher-forced exact match <=> the greedy output starts with the
    answer, sample by sample: kv (token-by-token streaming), mask (block-sparse prompt, the
    answer dense: its teacher-forced form is the continuation attending to every earlier
    key), prefill (the context compressed once before the question)."""
    loaded = models.load_model()
    spec = TaskSpec("passkey", 256, method, 0.0 if method == "dense" else 0.5)
    verdicts = {}
    for scored in ("teacher_forced", "generated"):
        config = config_for("smollm2-135m", 256, tmp_path, protocol, names=["passkey"],
                            samples=3, scoring=scored, max_new_tokens=6)
        samples = load_samples(config, loaded.tokenizer, spec)
        r = compute_task_cell(config, loaded, samples, spec)
        verdicts[scored] = [s["score"] == 1.0 if scored == "teacher_forced"
                            else s["starts_with_target"] for s in r["per_sample"]]
        if method != "dense":
            assert r["continuation_attention"] == {
                "kv": "streamed through the cache, evicted after every step",
                "mask": "dense (every earlier key)",
                "prefill": "the compressed cache and its own tokens"}[protocol]
    assert verdicts["teacher_forced"] == verdicts["generated"]
    if method == "dense":
        assert all(verdicts["generated"])  # and the default model does find the keys


def test_mask_protocol_generates_after_a_sparse_prefill(tiny, tmp_path):
    config = config_for(tiny.name, 448, tmp_path, "mask", names=["passkey"], samples=2,
                        scoring="generated", max_new_tokens=5)
    spec = TaskSpec("passkey", 448, "h2o", 0.5)
    samples = load_samples(config, tiny.tokenizer, spec)
    r = compute_task_cell(config, tiny, samples, spec)
    assert r["continuation_attention"] == "dense (every earlier key)"
    assert r["density"] < 0.9 and r["samples"] == 2
    # the first new token is the sparse prefill's own prediction
    first = tiny.tokenizer.decode(
        [int(_last_logits(tiny, samples.samples[0].prompt_ids, config, spec).argmax())])
    assert r["per_sample"][0]["output"].lstrip("\n").startswith(first.split("\n")[0])
    assert tiny.model.config._attn_implementation not in ("cabattn_mask", "cabattn_kv")


def _last_logits(loaded, ids, config, spec):
    with cell.attention(config, loaded.model, spec), torch.no_grad():
        return loaded.model(torch.tensor([ids])).logits[0, -1]


def test_task_file_generated_and_scored(tiny_model, tmp_path):
    from eval import cli
    from eval.results import read_json
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"context": "the river ran by the city. " * 80, "input": "What ran by the city?",
         "answers": ["the river"], "all_classes": None},
        {"context": "the king had an army.", "input": "Who had an army?",
         "answers": ["the king", "a king"]}]))
    assert cli.main(["--model", str(tiny_model), "--task-files", str(path), "--task-metric",
                     "rouge_l", "--methods", "dense", "h2o", "--context-lengths", "256",
                     "--sparsity-levels", "0.5", "--no-sparsity-sweep", "--max-new-tokens", "4",
                     "--output-dir", str(tmp_path), "--name", "qa", "--yes",
                     "--no-report"]) == 0
    r = read_json(tmp_path / "qa.json")["tasks"]["qa"]["h2o"]["context_length_sweep"]["256"]
    assert r["scoring"] == "generated" and r["metric"] == "rouge_l" and r["samples"] == 2
    assert 0.0 <= r["accuracy"] <= 1.0 and all("output" in s for s in r["per_sample"])
    # the long context was cut in the middle to leave room for the new tokens
    samples = load_samples(config_for(str(tiny_model), 256, tmp_path, files=[str(path)],
                                      max_new_tokens=4), models.load_tokenizer(str(tiny_model)),
                           TaskSpec("qa", 256, "dense", 0.0))
    assert len(samples.samples[0].prompt_ids) == 256 - 4


def test_answer_metrics_as_longbench_defines_them():
    assert scoring.exact_match("The River.", "river") == 1.0
    assert scoring.f1("The cat sat", "a cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert scoring.f1("dog", "cat") == 0.0
    assert scoring.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert scoring.rouge_l("x y", "a b") == 0.0
    interval, how = scoring.accuracy_interval([1, 1, 0, 1], seed=0)
    assert how == "wilson" and interval[0] < 0.75 < interval[1]
    assert scoring.accuracy_interval([0.5, 1.0, 0.25], seed=0)[1] == "bootstrap"
