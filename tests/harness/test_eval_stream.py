"""python -m eval.stream on the tiny model (512 positions): a stream three times longer, every
method, the JSON's stream section, the figure, resuming from the cell store, bad input."""
import json
import math

import pytest

from eval import stream


def _args(model, text, out, *extra):
    return ["--model", str(model), "--data-file", str(text), "--dataset", "tiny",
            "--output-dir", str(out), "--tokens", "1536", "--cache", "64", "--chunk", "16",
            "--segment", "256", "--summary-tokens", "512", "--block-size", "16", *extra]


def test_a_stream_past_the_models_positions(tiny_model, tiny_text, tmp_path, single_thread,
                                            capsys):
    assert stream.main(_args(tiny_model, tiny_text, tmp_path)) == 0
    document = json.loads((tmp_path / "stream.json").read_text())
    results = document["stream"]
    assert list(results) == list(stream.STREAM_METHODS)
    assert document["config"]["model_positions"] == 512
    for label, r in results.items():
        ends = [s["end"] for s in r["segments"]]
        # dense stops at the model's positions; the others stream all 1536 tokens
        assert ends[-1] == (512 if label == "dense" else 1536)
        assert ends == sorted(ends) and all(math.isfinite(s["perplexity"])
                                            for s in r["segments"])
        assert r["num_tokens"] == ends[-1] - 1 and r["tokens_per_second"] > 0
        assert r["last_tokens"] == 511 if label == "dense" else r["last_tokens"] == 512
        if label != "dense":
            assert (r["positions"], r["kv_chunk"]) == ("cache", 16)
    assert results["window"]["params"] == {"n_sink": 0}
    assert (tmp_path / "stream_stream.png").is_file()
    capsys.readouterr()
    # a rerun computes nothing: every method is a stored cell
    assert stream.main(_args(tiny_model, tiny_text, tmp_path, "--methods", "h2o")) == 0
    assert json.loads((tmp_path / "stream.json").read_text())["stream"]["h2o"] == results["h2o"]


@pytest.mark.parametrize("extra,message", [
    (["--methods", "h2o", "sinkless"], "unknown stream method"),
    (["--cache", "2048"], "smaller than --tokens"),
    (["--segment", "4096"], "longer than the stream"),
])
def test_bad_input_fails_before_loading(extra, message, tiny_model, tiny_text, tmp_path,
                                        no_model_loading, capsys):
    assert stream.main(_args(tiny_model, tiny_text, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err


def test_a_bos_enters_the_stream_key_only_when_the_stream_starts_with_one(tiny_model, tiny_text,
                                                                        tmp_path):
    """A stream of a model whose tokenizer puts a BOS first (its windows start with it) is
    another cell; the keys of streams without a BOS stay what they were."""
    args = stream.build_parser().parse_args(_args(tiny_model, tiny_text, tmp_path))
    plain = stream.stream_key(args, "h2o", 512, None)
    assert "bos_token_id" not in plain
    assert stream.stream_key(args, "h2o", 512, 2) == {**plain, "bos_token_id": 2}
