"""Experiment configs: the YAML files hold the original values, the command line overrides them,
and every bad input fails fast with a clear message before any model is loaded."""
import pytest

from eval import config as cfg
from eval import cli, data, models, runner
from eval.config import ConfigError


def test_quick_test_yaml_has_the_original_values():
    quick = cfg.load_config(cfg.QUICK_TEST_YAML)[0]
    assert quick.model.name == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert quick.model.max_length == 1024
    assert quick.datasets == ["wikitext-2"]
    assert quick.context_length_sweep.context_lengths == [512, 1024]
    assert quick.context_length_sweep.fixed_sparsity == 0.9
    assert quick.sparsity_sweep.sparsity_levels == [0.0, 0.9]
    assert quick.sparsity_sweep.fixed_context_length == 1024
    assert quick.protocol == "mask" and quick.seed == 42


def test_quick_test_offline_fallback():
    offline = cfg.create_quick_test(hub_online=False)
    assert offline.model.name == models.DEFAULT_MODEL
    assert offline.datasets == ["enwiki-sample", "pd-books", "brown"]
    assert offline.methods == ["dense", "h2o", "cab_v4", "cab_v3", "streaming_llm"]
    assert offline.sparsity_sweep.sparsity_levels == [0.0, 0.5, 0.9]
    assert offline.sparsity_sweep.fixed_context_length == 1024  # kept from the original
    assert offline.context_length_sweep.context_lengths == [512, 1024]
    assert offline.max_windows == 4 and offline.offline_fallback is None
    assert "unreachable" in offline.description and "offline defaults" in offline.description
    online = cfg.create_quick_test(hub_online=True)
    assert online.model.name.startswith("TinyLlama/") and online.datasets == ["wikitext-2"]
    assert "reachable" in online.description


def test_original_python_api_names():
    import eval
    assert eval.run_benchmark is runner.run_benchmark
    assert eval.PerplexityBenchmarkRunner is runner.PerplexityBenchmarkRunner
    assert eval.create_quick_test is cfg.create_quick_test
    assert eval.ExperimentConfig is cfg.ExperimentConfig and eval.ModelConfig is cfg.ModelConfig
    with pytest.raises(AttributeError, match="no attribute 'run_benchmarks'"):
        eval.run_benchmarks


def test_icml_and_ablation_yaml_values():
    (icml,) = cfg.load_config(cfg.ICML_FULL_YAML)
    assert icml.model.name == "meta-llama/Llama-2-7b-hf"
    assert icml.datasets == ["wikitext-103", "c4", "pg19"]
    baselines = ["dense", "h2o", "cab_v4", "cab_v3", "streaming_llm", "local_strided", "random",
                 "snapkv", "pyramidkv", "adakv", "tova", "quest", "knorm", "oracle_topk"]
    assert icml.methods == baselines
    assert icml.context_length_sweep.context_lengths == [512, 1024, 2048, 4096]
    assert icml.sparsity_sweep.sparsity_levels == [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
    assert icml.sparsity_sweep.fixed_context_length == 4096
    (ablation,) = cfg.load_config(cfg.CONFIG_DIR / "ablation_sparsity.yaml")
    assert ablation.sparsity_sweep.sparsity_levels == [
        0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    assert ablation.sparsity_sweep.fixed_context_length == 4096
    assert not ablation.context_length_sweep.enabled
    # every method at s = 0.5, 0.8, 0.9 and L = 1024, 2048 on the offline defaults
    runs = cfg.load_config(cfg.CONFIG_DIR / "baselines.yaml")
    assert [run.methods for run in runs] == [baselines, baselines]
    assert {cell for run in runs for cell in run.sweep_points()} == {
        (length, s) for length in (1024, 2048) for s in (0.5, 0.8, 0.9)}
    assert {run.model.name for run in runs} == {"smollm2-135m"}
    # the retrieval measurement: tasks only, 20 samples, one experiment per L in order (the
    # answer decoded densely), then the 1K tasks with the answer block-sparse too
    runs = cfg.load_config(cfg.CONFIG_DIR / "retrieval.yaml")
    assert [run.sweep_points() for run in runs] == [
        [(length, s) for s in (0.5, 0.8, 0.9)] for length in (1024, 2048, 4096, 1024)]
    assert [(tuple(run.datasets), tuple(run.tasks.names), run.tasks.haystack, run.tasks.samples)
            for run in runs] == [((), ("passkey", "niah_single", "niah_multikey"), "text", 20),
                                 ((), ("passkey", "niah_single"), "text", 20),
                                 ((), ("niah_single",), "text", 20),
                                 ((), ("passkey", "niah_single"), "text", 20)]
    assert [len(run.methods) for run in runs] == [5, 5, 4, 4]
    assert [(run.protocol, run.decoding) for run in runs] == [("mask", "dense")] * 3 + [
        ("mask", "sparse")]


def test_experiments_list_with_defaults(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("defaults:\n  methods: [dense, h2o]\n  model: {name: x, torch_dtype: float32}\n"
                    "experiments:\n  - {name: a, datasets: [brown]}\n"
                    "  - {name: b, datasets: [pd-books], model: {name: y}}\n")
    a, b = cfg.load_config(path)
    assert (a.name, a.datasets, a.methods, a.model.name) == ("a", ["brown"], ["dense", "h2o"], "x")
    assert (b.model.name, b.model.torch_dtype) == ("y", "float32")


@pytest.mark.parametrize("text, message", [
    ("name: x\nsparsity_levels: [0.9]\n", "unknown key(s) ['sparsity_levels']"),
    ("model: {name: x, dtype: float16}\n", "config.yaml.model: unknown key(s) ['dtype']"),
    ("name: [unclosed\n", "is not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_bad_yaml_names_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        cfg.load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.load_config("no/such/config.yaml")


def _args(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_command_line_overrides():
    (c,), notes = cli.configs_from_args(_args(
        "--datasets", "brown", "--method", "h2o", "--context-lengths", "256", "512",
        "--sparsity-levels", "0", "0.75", "--max-windows", "3", "--protocol", "kv",
        "--kv-chunk", "4", "--block-size", "32", "--param", "h2o.h2o_recent_ratio=0.25",
        "--seed", "7", "--name", "t", "--dtype", "float32"))
    assert notes == [] and c.name == "t" and c.datasets == ["brown"] and c.methods == ["h2o"]
    assert c.context_length_sweep.context_lengths == [256, 512]
    assert c.sparsity_sweep.fixed_context_length == 512  # the largest swept length
    assert c.sparsity_sweep.sparsity_levels == [0.0, 0.75]
    assert (c.max_windows, c.protocol, c.kv_chunk, c.block_size, c.seed) == (3, "kv", 4, 32, 7)
    assert c.method_params == {"h2o": {"h2o_recent_ratio": 0.25}}
    assert c.model.torch_dtype == "float32"
    (c,), _ = cli.configs_from_args(_args("--context-lengths", "256", "512",
                                          "--fixed-context-length", "256"))
    assert c.sparsity_sweep.fixed_context_length == 256


def test_bad_param_syntax_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        _args("--param", "magnitude_ratio=0.5")
    assert "METHOD.NAME=VALUE" in capsys.readouterr().err


BAD_INPUTS = [
    (["--methods", "dense", "cab_v9"], "unknown method 'cab_v9'"),
    (["--methods", "oracle_topk", "--protocol", "kv"], "oracle_topk has no kv-protocol rule"),
    (["--sparsity-levels", "0", "1.0"], "sparsity 1.0 is outside [0, 1)"),
    (["--sparsity-levels", "-0.1"], "sparsity -0.1 is outside [0, 1)"),
    (["--fixed-sparsity", "1.5"], "sparsity 1.5 is outside [0, 1)"),
    (["--context-lengths", "256", "1024"], "context length 1024 exceeds"),
    (["--block-size", "48"], "block_size 48 is not supported"),
    (["--param", "cab_v4.magnitude_ratio=2"], "magnitude_ratio"),
    (["--param", "h2o.no_such_param=1"], "no_such_param"),
    (["--max-windows", "0"], "max_windows 0"),
    (["--kv-chunk", "0"], "kv_chunk 0"),
    (["--device", "tpu"], "model.device 'tpu'"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_fails_before_loading(argv, message, tiny_model, tiny_text, tmp_path,
                                        no_model_loading, capsys):
    base = ["--model", str(tiny_model), "--data-file", str(tiny_text), "--methods", "dense",
            "h2o", "cab_v4", "--context-lengths", "128", "256", "--output-dir", str(tmp_path),
            "--yes"]
    assert cli.main(base + argv) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration") and message in err, err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_unknown_dataset_fails_before_loading(tiny_model, tmp_path, no_model_loading, capsys):
    assert cli.main(["--model", str(tiny_model), "--datasets", "brown", "wikitext-7",
                     "--method", "dense", "--context-lengths", "128", "--output-dir",
                     str(tmp_path), "--yes"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "unknown dataset 'wikitext-7'" in err and "enwiki-sample" in err


def test_missing_data_file_fails_before_loading(tiny_model, tmp_path, no_model_loading, capsys):
    missing = tmp_path / "nope.txt"
    assert cli.main(["--model", str(tiny_model), "--data-file", str(missing), "--method",
                     "dense", "--context-lengths", "128", "--output-dir", str(tmp_path),
                     "--yes"]) == cli.EXIT_CONFIG
    assert str(missing) in capsys.readouterr().err


def test_hub_dataset_offline_fails_before_loading(tiny_model, tmp_path, no_model_loading,
                                                  monkeypatch, capsys):
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    assert cli.main(["--model", str(tiny_model), "--datasets", "wikitext-103", "--method",
                     "dense", "--context-lengths", "128", "--output-dir", str(tmp_path),
                     "--yes"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "wikitext-103" in err and "--data-file" in err


def test_several_problems_are_reported_together(tiny_model, tiny_text, tmp_path,
                                                no_model_loading, capsys):
    assert cli.main(["--model", str(tiny_model), "--data-file", str(tiny_text), "--methods",
                     "nope", "--sparsity-levels", "2", "--context-lengths", "128",
                     "--output-dir", str(tmp_path), "--yes"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "sparsity 2.0" in err


def test_k_min_is_settable_and_checked(capsys):
    (c,), _ = cli.configs_from_args(_args("--k-min", "32"))
    assert c.k_min == 32
    c.k_min = 0
    with pytest.raises(ConfigError, match="k_min 0 must be a positive integer"):
        cfg.validate(c, check_model=False)
    with pytest.raises(SystemExit):
        _args("--k-min", "0")
    assert "'0' is not a positive integer" in capsys.readouterr().err


def test_help_is_built_from_the_registries():
    from cabattn import methods as registry
    text = " ".join(cli.build_parser().format_help().split())  # as if never wrapped
    for entry in data.DATASETS.values():
        assert f"{entry.name} ({'hub' if entry.hub else 'offline'}): {entry.description}" in text
    for name, cls in registry.METHODS.items():
        assert f" {name}" in text
        for param, (default, doc) in cls.parameters().items():
            assert f"{param} = {default!r}: {doc}" in text


def test_this_rounds_configs_validate_as_documented():
    """configs/prefill.yaml, protocols.yaml and models.yaml: every experiment validates (no
    model loaded) and runs what its comment says."""
    prefill = cfg.load_config(cfg.CONFIG_DIR / "prefill.yaml")
    protocols = cfg.load_config(cfg.CONFIG_DIR / "protocols.yaml")
    models = cfg.load_config(cfg.CONFIG_DIR / "models.yaml")
    for run in prefill + protocols + models:
        cfg.validate(run, check_model=False)
    assert {run.protocol for run in prefill} == {"prefill"}
    assert [run.tasks.question_aware for run in prefill if run.tasks.names] == [
        False, True, False, True]
    assert {run.context_lengths()[0] for run in prefill} == {1024, 2048}
    assert [(run.protocol, run.continuation) for run in protocols] == [
        ("mask", 128), ("kv", 128), ("kv", None)]
    assert [run.model.name for run in models] == ["smollm2-135m"] + ["gemma3-270m"] * 3
    assert {run.protocol for run in models} == {"mask", "prefill"}
    long = models[-1]
    assert long.context_lengths() == [8192, 16384] and long.datasets == ["pd-books"]
