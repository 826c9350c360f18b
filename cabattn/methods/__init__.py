"""The method registry: one small class per method, looked up by name.

    cabattn.methods.available()                 -> ["cab_v3", "cab_v4", "dense", ...]
    cabattn.methods.get_method("h2o", h2o_recent_ratio=0.25)
"""
from .base import BlockPlan, KVPages, KVState, MaskContext, Method

METHODS: dict = {}


def register(cls):
    """Class decorator: makes a Method subclass available under its `name`."""
    METHODS[cls.name] = cls
    return cls


def available() -> list:
    return sorted(METHODS)


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
from . import (cab, dense, h2o, knorm, local_strided, oracle_topk, quest,  # noqa: E402,F401
               random, streaming_llm, tova)

__all__ = ["BlockPlan", "KVPages", "KVState", "MaskContext", "Method", "METHODS", "available",
           "get_method", "register"]
