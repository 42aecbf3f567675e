"""Warnings that point at the user's line, however deep inside mechnorm they are raised."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside mechnorm.

    A fixed ``stacklevel`` names a different mechnorm file depending on the route in
    (``mechnorm.integrated_gradients`` directly, or through ``mechnorm.attribute``).

    Example:
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("demo")
        >>> caught[0].filename.endswith("warn.py")
        False
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
