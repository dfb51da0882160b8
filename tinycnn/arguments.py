"""The values users pass (sizes, counts, rates, coefficients), checked in one place with one style.

Each function returns the value in its canonical Python type or raises: TypeError when the value
is not even of the right kind (a string for a size), ValueError when it is of the right kind but
outside what the argument allows. Every message names the argument, what it must be and what it
got. Integers are never truncated: 2.0 is the size 2, but 2.7 is refused.
"""
import math
import numbers

__all__ = ["integer", "integer_tuple", "real", "choice"]


def _describe(value):
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (int, float, str)) else repr(value)


def _scalar(value):
    """A 0-d array (NumPy's or CuPy's, e.g. np.array(8)) as the Python number it holds."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def integer(value, name, minimum=None, maximum=None):
    """An int (an integral float such as 2.0 is accepted; booleans are not)."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    if isinstance(value, numbers.Integral):
        result = int(value)
    elif math.isfinite(float(value)) and float(value).is_integer():
        result = int(value)
    else:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
        if minimum == 1 and maximum is None:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        bounds = (f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}") if minimum is not None \
            else f"<= {maximum}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return result


def integer_tuple(value, name, length=None, minimum=None):
    """A tuple of ints from a sequence; a single int is repeated `length` times when a length is given."""
    value = _scalar(value)
    if length is not None and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return (integer(value, name, minimum),) * length
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        expected = f"an integer or a tuple of {length} integers" if length else "a tuple of integers"
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}")
    items = tuple(value)
    if length is not None and len(items) != length:
        raise ValueError(f"{name} must be an integer or a tuple of {length} integers, got {value!r}")
    try:
        return tuple(integer(v, name, minimum) for v in items)
    except (TypeError, ValueError):
        bound = "" if minimum is None else f" (each >= {minimum})"
        raise ValueError(f"{name} must be {'a tuple of ' + str(length) if length else 'a tuple of'} integers"
                         f"{bound}, got {value!r}") from None


def real(value, name, low=None, high=None, low_open=False, high_open=False):
    """A finite float within [low, high] (either end open when asked)."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    result = float(value)
    inside = math.isfinite(result)
    if inside and low is not None:
        inside = result > low if low_open else result >= low
    if inside and high is not None:
        inside = result < high if high_open else result <= high
    if not inside:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        if low is None and high is None:
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        raise ValueError(f"{name} must be in {lo or '(-inf'}, {hi or 'inf)'}, got {value!r}")
    return result


def choice(value, name, options):
    """One of `options` (strings compared case-insensitively)."""
    key = value.lower() if isinstance(value, str) else value
    if key not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return key
