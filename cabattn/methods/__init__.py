"""The method registry: one small class per method, looked up by name.

    cabattn.methods.available()                 -> ["adakv", "cab_v3", "cab_v4", ...]
    cabattn.methods.available("kv")             -> the methods with a kv-protocol rule
    cabattn.methods.get_method("h2o", h2o_recent_ratio=0.25)
"""
from .base import BlockPlan, KVPages, KVState, MaskContext, Method, RaggedKeep
from .registry import METHODS, available, get_method, register

# Importing the modules registers their classes.
from . import (adakv, cab, dense, h2o, knorm, local_strided, oracle_topk,  # noqa: F401
               pyramidkv, quest, random, snapkv, streaming_llm, tova)

__all__ = ["BlockPlan", "KVPages", "KVState", "MaskContext", "Method", "METHODS", "RaggedKeep",
           "available", "get_method", "register"]
