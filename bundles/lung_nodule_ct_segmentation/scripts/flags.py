"""On/off config keys given on the command line.

``python -m monai.bundle run --key true`` hands the config the *string* ``'true'`` (and ``--key false``
the string ``'false'``, which Python treats as true). ``as_flag`` turns the usual spellings into a
bool and refuses anything else, naming the key.
"""

from __future__ import annotations

from typing import Any

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def as_flag(value: Any, name: str = "flag") -> bool:
    """``value`` (bool, 0/1, or a string such as ``'true'``/``'False'``/``'off'``) as a bool.

    Raises:
        ValueError: for any other value, with ``name`` in the message.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name}: expected true or false, got {value!r}")
