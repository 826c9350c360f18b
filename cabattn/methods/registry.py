"""The method registry: every Method subclass by its name, and the one way to build one."""
from ..checks import lookup
from .base import Method

METHODS: dict = {}


def register(cls):
    """Class decorator: makes a Method subclass available under its `name`."""
    METHODS[cls.name] = cls
    return cls


def available() -> list:
    return sorted(METHODS)


def get_method(name: str, **params) -> Method:
    """The named method with its parameters validated (ValueError names the valid choices)."""
    cls = lookup("method", name, dict(sorted(METHODS.items())))
    unknown = sorted(set(params) - set(cls.parameters()))
    if unknown:
        valid = ", ".join(sorted(cls.parameters())) or "none"
        raise ValueError(f"method {name!r} has no parameter(s) {unknown}; "
                         f"its parameters are: {valid}")
    return cls(**params)
