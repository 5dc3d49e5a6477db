"""Argument checks for SamplingParams and Config: a value of the wrong type or outside its range
is a ValueError naming the field, raised before anything runs.

bool is refused where an int or a number is meant (Python counts True as 1), and numpy scalars
are taken as the Python numbers they stand for.
"""
import math
import numbers

SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.manual_seed takes: any 64-bit pattern, signed or not
FLOAT32_MAX = 3.4028234663852886e38  # above it a float32 is inf


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {_range(low, high)}, got {value}")
    return value


def real(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    """A finite number in [low, high] ((low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        raise ValueError(f"{name} must be a finite number {_range(low, high, low_open)}, got {value}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _range(low, high, low_open=False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"<= {high}" if high is not None else ""
