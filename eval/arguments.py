"""Argument types shared by the command lines (eval.cli, eval.stream): each turns a flag's text
into its value or raises argparse.ArgumentTypeError naming the bad value."""
import argparse

import yaml

from .executors import parse_shard


def method_param(text: str) -> tuple:
    """METHOD.NAME=VALUE -> (method, name, value); VALUE is read as YAML (0.5, true, high)."""
    target, sep, value = text.partition("=")
    method, dot, name = target.partition(".")
    if not (sep and dot and method and name):
        raise argparse.ArgumentTypeError(f"{text!r} is not METHOD.NAME=VALUE "
                                         "(e.g. cab_v4.magnitude_ratio=0.7)")
    return method, name, yaml.safe_load(value)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def block_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size {text!r} is not 'auto' or an integer") \
            from None


def shard(text: str) -> tuple:
    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_option(group, option, help_prefix: str = "") -> None:
    """The flag --NAME-WITH-DASHES of a declared option (cabattn.checks.Option); it defaults to
    None (not given), so that a preset's or file's value stands unless the flag is given."""
    flag, help_text = "--" + option.name.replace("_", "-"), help_prefix + option.doc
    if isinstance(option.default, bool):
        group.add_argument(flag, action="store_true", default=None, help=help_text)
    elif option.choices:
        group.add_argument(flag, choices=option.choices, help=f"{help_text} ({option.default})")
    else:
        group.add_argument(flag, type=type(option.default), metavar=option.name.upper(),
                           help=f"{help_text} ({option.default})")
