"""The method registry: one small class per method, looked up by name.

    cabattn.methods.available()                 -> ["cab_v3", "cab_v4", "dense", ...]
    cabattn.methods.get_method("h2o", h2o_recent_ratio=0.25)
"""
from .base import BlockPlan, KVState, MaskContext, Method
from .registry import METHODS, available, get_method, register

# Importing the modules registers their classes.
from . import cab, dense, h2o, local_strided, random, streaming_llm  # noqa: F401

__all__ = ["BlockPlan", "KVState", "MaskContext", "Method", "METHODS", "available", "get_method",
           "register"]
