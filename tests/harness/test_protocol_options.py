"""A protocol's own option is declared once, on the protocol (docs/protocols.md, Options): its
constructor keyword, the harness's YAML key and flag, the validation and the cell key follow
the declaration."""
import inspect

import pytest

from cabattn import PROTOCOLS, protocol_options
from eval import cli
from eval.config import ConfigError, ExperimentConfig, validate

DECLARED = [(protocol, option) for protocol in PROTOCOLS.values() for option in protocol.OPTIONS]


@pytest.mark.parametrize("protocol, option", DECLARED,
                         ids=[option.name for _, option in DECLARED])
def test_each_declared_option_is_a_keyword_a_yaml_key_and_a_flag(protocol, option):
    keyword = inspect.signature(protocol).parameters[option.name]
    assert keyword.default == option.default
    assert getattr(ExperimentConfig(), option.name) == option.default
    flag = "--" + option.name.replace("_", "-")
    assert flag in cli.build_parser().format_help()
    assert option.check(option.default) is None


def test_a_flag_reaches_the_config_and_a_bad_value_is_named():
    parser = cli.build_parser()
    (config,), _ = cli.configs_from_args(parser.parse_args(
        ["--kv-chunk", "4", "--causal-selection", "block", "--diagnostics"]))
    assert (config.kv_chunk, config.causal_selection, config.diagnostics) == (4, "block", True)
    (config,), _ = cli.configs_from_args(parser.parse_args([]))
    assert {name: getattr(config, name) for name in protocol_options()} == {
        name: option.default for name, option in protocol_options().items()}
    config.kv_chunk, config.diagnostics = 0, "yes"
    with pytest.raises(ConfigError) as err:
        validate(config, check_model=False)
    assert "kv_chunk 0 must be a positive integer" in str(err.value)
    assert "diagnostics 'yes' must be true or false" in str(err.value)
