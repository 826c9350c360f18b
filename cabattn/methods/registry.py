"""The method registry: every Method subclass by its name, and the one way to build one."""
from typing import Optional

from ..checks import lookup
from .base import Method

METHODS: dict = {}


def register(cls):
    """Class decorator: makes a Method subclass available under its `name`."""
    METHODS[cls.name] = cls
    return cls


def available(protocol: Optional[str] = None) -> list:
    """The registered names; with a protocol ("mask", "kv" or "prefill"), those whose default
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
    cls = lookup("method", name, dict(sorted(METHODS.items())))
    unknown = sorted(set(params) - set(cls.parameters()))
    if unknown:
        valid = ", ".join(sorted(cls.parameters())) or "none"
        raise ValueError(f"method {name!r} has no parameter(s) {unknown}; "
                         f"its parameters are: {valid}")
    return cls(**params)
