"""Field checks for the config dataclasses: a wrong type or value fails at construction with a one-line message.

Configs are also rebuilt from JSON (``config.json``, calibration files), so every field must be plain data of the
declared type; these helpers keep ``__post_init__`` short.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["CONFIG_TYPES", "check_bool", "check_choice", "check_config_json", "check_fraction", "check_int"]


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    """An ``int`` (not a bool) in ``[lo, hi]``."""
    bounds = f" in {lo}..{hi}" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer{bounds}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer{bounds}, got {value}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_fraction(name: str, value: Any, *, closed_low: bool = True) -> None:
    """A real number in ``[0, 1)`` (or ``(0, 1)`` with ``closed_low=False``)."""
    interval = "[0, 1)" if closed_low else "(0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    if not ((value >= 0 if closed_low else value > 0) and value < 1):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


CONFIG_TYPES = ("EoRAConfig", "RTNConfig", "GPTQConfig", "PruneConfig")  # what JSON may build, nothing else


def check_config_json(data: Any, where: str = "config") -> None:
    """Refuse a ``config_to_dict`` tree that names anything but our four configs or holds anything but plain values
    and nested configs: a crafted ``config.json`` or calibration file must not reach a constructor that runs code.
    (Field names and value types are checked when the config is built, by its ``__post_init__``.)"""
    if not isinstance(data, dict) or not isinstance(data.get("_data"), dict) or data.get("_type") not in CONFIG_TYPES:
        kind = data.get("_type") if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{where}: refusing to build {kind!r} from JSON (only {', '.join(CONFIG_TYPES)} are allowed); "
            "the file was not written by torchao-eora or was tampered with"
        )
    for key, value in data["_data"].items():
        if isinstance(value, dict):
            check_config_json(value, where)
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            raise ValueError(f"{where}: {data['_type']}.{key} must be a plain value, got {type(value).__name__}")
