"""How a setting is declared once and then checked, read from files and turned into flags.

A setting is a dataclass field made by ``setting``: its default, its help text, its allowed
values (``choices``) or a ``check`` with the ``requirement`` it states. ``validate`` checks
every setting of a dataclass instance and then its ``rules`` (conditions between settings);
``coerce`` turns a YAML value or a command-line string into the field's type, refusing rather
than converting a value of another type. This module imports no TensorFlow, so that
``keras-vae --help`` and config files stay cheap.
"""

import dataclasses
import math
import numbers
import typing


class ConfigError(ValueError):
    """A setting that is unknown or invalid; the message names the key."""


def setting(default, help, choices=None, check=None, requirement=None):
    """A dataclass field with its documentation and validation.

    ``choices``: the allowed values (a tuple, or a function returning one, so that a
    registry can be read when the check runs); ``check``: a predicate on the value, with
    ``requirement`` the phrase that completes "must ..." in its error. Its command-line flag
    is its name with dashes.
    """
    metadata = {
        "help": help,
        "choices": choices,
        "check": check,
        "requirement": requirement,
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("setting defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=metadata)


def choices_of(field):
    """The allowed values of ``field``, or None."""
    choices = field.metadata.get("choices")
    return choices() if callable(choices) else choices


def positive(value):
    return value >= 1


def finite_nonnegative(value):
    return 0 <= value < math.inf


def finite_positive(value):
    return 0 < value < math.inf


def unit_interval_open_right(value):
    return 0 <= value < 1


def fail(key, requirement, value):
    raise ConfigError(f"config key {key!r} {requirement}; got {value!r}")


def validate(instance):
    """Checks each setting of the dataclass ``instance``, then each of its ``rules()``
    ``(key, ok, requirement)``; raises ConfigError naming the first key that fails, and
    returns ``instance``."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        coerce(field.name, value, field.type)
        choices = choices_of(field)
        if choices is not None and value not in choices:
            fail(field.name, f"must be one of {tuple(choices)}", value)
        check = field.metadata.get("check")
        if check is not None and not check(value):
            fail(field.name, f"must {field.metadata['requirement']}", value)
    for key, ok, requirement in instance.rules() if hasattr(instance, "rules") else ():
        if not ok:
            fail(key, requirement, getattr(instance, key))
    return instance


def _base_type(annotation):
    """(type, optional) of a field's annotation, e.g. ``str | None`` → (str, True)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    kind = next(a for a in args if a is not type(None)) if optional else annotation
    return typing.get_origin(kind) or kind, optional


def coerce(key, value, annotation, from_text=False):
    """``value`` as the field's type. YAML/JSON values must already have that type (an int
    for an int, a list of ints for a tuple; an int is accepted for a float); command-line
    strings (``from_text``) are parsed."""
    kind, optional = _base_type(annotation)
    type_name = getattr(kind, "__name__", str(kind))
    if from_text and optional and value in ("", "none", "None"):
        return None
    if value is None:
        if optional:
            return None
        fail(key, f"must be of type {type_name}", value)
    # PyYAML reads 1e-3 (no dot) as a string.
    if from_text or kind is float and isinstance(value, str):
        value = _parse(key, value, kind)
    if kind is tuple:
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
            fail(key, "must be a list of integers", value)
        return tuple(value)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind is int and not _is_int(value) or kind is not int and not isinstance(value, kind):
        fail(key, f"must be of type {type_name}", value)
    return value


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _parse(key, text, kind):
    """A command-line string as ``kind``; unparseable text is refused with the key."""
    try:
        if kind is tuple:
            return [int(v) for v in text.replace(" ", "").split(",") if v]
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if kind in (int, float):
            return kind(text)
        return text
    except ValueError:
        fail(key, f"must be of type {getattr(kind, '__name__', kind)}", text)
