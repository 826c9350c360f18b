"""The method registry: one small class per method, looked up by name.

    cabattn.methods.available()                 -> ["adakv", "cab_v3", "cab_v4", ...]
    cabattn.methods.available("kv")             -> the methods with a kv-protocol rule
    cabattn.methods.get_method("h2o", h2o_recent_ratio=0.25)
"""
from typing import Optional

from .base import BlockPlan, KVState, MaskContext, Method

METHODS: dict = {}


def register(cls):
    """Class decorator: makes a Method subclass available under its `name`."""
    METHODS[cls.name] = cls
    return cls


def available(protocol: Optional[str] = None) -> list:
    """The registered names; with a protocol ("mask" or "kv"), those whose default
    configuration has a rule for it (Method.check_protocol)."""
    return [name for name in sorted(METHODS)
            if protocol is None or _has_rule(METHODS[name](), protocol)]


def _has_rule(method: Method, protocol: str) -> bool:
    try:
        method.check_protocol(protocol)
    except ValueError:
        return False
    return True


def get_method(name: str, **params) -> Method:
    """The named method with its parameters validated (ValueError names the valid choices)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(available())}")
    cls = METHODS[name]
    unknown = sorted(set(params) - set(cls.parameters()))
    if unknown:
        valid = ", ".join(sorted(cls.parameters())) or "none"
        raise ValueError(f"method {name!r} has no parameter(s) {unknown}; "
                         f"its parameters are: {valid}")
    return cls(**params)


# Importing the modules registers their classes.
from . import (adakv, cab, dense, h2o, local_strided, pyramidkv, random, snapkv,  # noqa: E402,F401
               streaming_llm)

__all__ = ["BlockPlan", "KVState", "MaskContext", "Method", "METHODS", "available", "get_method",
           "register"]
