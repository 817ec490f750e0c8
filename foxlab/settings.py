"""Checked settings: what each setting of the config, ``train()`` and the command line accepts, in one table.

Each module declares its settings as ``{name: Setting}`` rows (a type, a range or a list of choices, whether None
is allowed). ``Setting.check`` refuses a wrong value with a message that names the setting and says what it
accepts; ``check_names`` refuses an unknown name and suggests the closest valid one; ``checked`` applies both to
every call of a function (and fails at import if a parameter has no row, so a new parameter cannot go unchecked).
The command line parses its flags with ``Setting.parse``, so a flag accepts exactly what the Python argument does.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace


class SettingError(TypeError, ValueError):
    """A setting with an unknown name, a wrong type or a value out of range.

    Both a TypeError and a ValueError, so code that catches either keeps working. ``name`` is the setting."""

    def __init__(self, message: str, name: str | None = None):
        super().__init__(message)
        self.name = name


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _is_number(value) -> bool:
    """A finite real number; bools do not count, although Python makes them ints."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _plain(number, kind):
    """``number`` as a Python int or float (numpy's and torch's scalars are not JSON-serializable)."""
    return number if type(number) in (int, float) else kind(number)


def _shown(value) -> str:
    """A value as an error message shows it: its repr (shortened), or its type for other objects."""
    if isinstance(value, (str, numbers.Number, list, tuple, dict, type(None))):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"an object of type {type(value).__name__}"


@dataclass(frozen=True)
class Setting:
    """What one setting accepts.

    kind: ``int``, ``float`` (any finite real number), ``bool`` (True or False only), ``str``, ``list`` (of
    ``length`` numbers, each in the range) or a tuple of classes an object must be an instance of.
    low/high: inclusive bounds; above/below: exclusive ones. choices: the allowed strings. optional: None allowed.
    extra: a further check, value -> None or the problem, worded to follow the setting's name ("'cuda' is not
    available: ..."). text: says what is accepted, where the kind alone does not.
    """

    kind: type | tuple
    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple = ()
    optional: bool = False
    length: int | None = None
    extra: Callable | None = None
    text: str = ""

    def _range(self) -> str:
        """The bounds as messages show them: " in [0, 1]", " > 0", " < 1" or ""."""
        low = ("[", ">=", self.low) if self.low is not None else ("(", ">", self.above)
        high = ("]", "<=", self.high) if self.high is not None else (")", "<", self.below)
        if low[2] is not None and high[2] is not None:
            return f" in {low[0]}{_fmt(low[2])}, {_fmt(high[2])}{high[0]}"
        for _, sign, bound in (low, high):
            if bound is not None:
                return f" {sign} {_fmt(bound)}"
        return ""

    def describe(self) -> str:
        """What the setting accepts, in words: "a number in [0, 1]", "True or False", "one of 'a', 'b' or None"."""
        if self.text:
            what = self.text
        elif self.choices:
            what = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind is bool:
            what = "True or False"
        elif self.kind is int:
            what = "an integer" + self._range()
        elif self.kind is float:
            what = "a number" + self._range()
        elif self.kind is list:
            what = f"a list of {self.length} numbers" + (", each" + self._range() if self._range() else "")
        else:
            kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
            what = "a " + " or ".join(k.__name__ for k in kinds)
        if not self.optional:
            return what
        return what + (", or None" if "," in what else " or None")

    def _in_range(self, x) -> bool:
        return ((self.low is None or x >= self.low) and (self.high is None or x <= self.high)
                and (self.above is None or x > self.above) and (self.below is None or x < self.below))

    def _kind_ok(self, value) -> bool:
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is int:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if self.kind is float:
            return _is_number(value)
        if self.kind is list:
            return isinstance(value, (list, tuple)) and len(value) == self.length and all(map(_is_number, value))
        return isinstance(value, self.kind)

    def problem(self, value) -> str | None:
        """None if ``value`` is acceptable, else "must be <what it accepts>, got <value>"."""
        if value is None and self.optional:
            return None
        wrong = f"must be {self.describe()}, got {_shown(value)}"
        if not self._kind_ok(value):
            kind = type(value).__name__
            shows_kind = self.kind is list or wrong.endswith(kind)
            return wrong if shows_kind else wrong + f" ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"
        values = value if self.kind is list else [value] if self.kind in (int, float) else []
        if not all(self._in_range(v) for v in values):
            return wrong
        if self.choices and isinstance(value, str) and value not in self.choices:
            near = closest(value, self.choices)
            return wrong + (f"; did you mean {near!r}?" if near else "")
        return self.extra(value) if self.extra is not None else None

    def check(self, name: str, value, where: str = ""):
        """``value`` if acceptable, else SettingError "<where><name> must be ...". Numbers come back as Python's
        own (a numpy integer as an int: they are saved as JSON) and a ``list`` setting as a list."""
        problem = self.problem(value)
        if problem is not None:
            raise SettingError(f"{where}{name} {problem}", name)
        if value is None:
            return None
        if self.kind is list:
            return [_plain(v, float) for v in value]
        return _plain(value, self.kind) if self.kind in (int, float) else value

    def parse(self, text: str):
        """A command-line value: ``text`` converted to the setting's kind and checked (ValueError if wrong)."""
        try:
            value = int(text) if self.kind is int else float(text) if self.kind is float else text
        except ValueError:
            raise ValueError(f"must be {replace(self, optional=False).describe()}, got {text!r}") from None
        problem = replace(self, optional=False).problem(value)  # a flag is either given a value or left out
        if problem is not None:
            raise ValueError(problem)
        return value


# Shorthands for the tables.
def integer(low=None, high=None, optional=False) -> Setting:
    return Setting(int, low=low, high=high, optional=optional)


def number(low=None, high=None, *, above=None, below=None, optional=False) -> Setting:
    return Setting(float, low=low, high=high, above=above, below=below, optional=optional)


def flag() -> Setting:
    return Setting(bool)


def choice(*options: str, optional=False) -> Setting:
    return Setting(str, choices=options, optional=optional)


def path(optional=False) -> Setting:
    return Setting((str, os.PathLike), optional=optional, text="a path (str or os.PathLike)")


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name most like ``name`` (difflib), or None if none is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return match[0] if match else None


def check_names(given: Iterable[str], valid: Iterable[str], where: str = "", also: Iterable[str] = ()) -> None:
    """Refuse the first name in ``given`` that is neither in ``valid`` nor in ``also``, suggesting the closest of
    ``valid`` (``also``: names accepted but not worth suggesting, e.g. transformers' own config keys)."""
    valid = list(valid)
    accepted = set(valid) | set(also)
    for name in given:
        if name not in accepted:
            near = closest(name, valid)
            hint = f"; did you mean {near!r}?" if near else f"; valid settings: {', '.join(sorted(valid))}"
            raise SettingError(f"{where}unknown setting {name!r}{hint}", name)


def require_rows(fn, table: dict[str, Setting], ignore: Iterable[str] = ()) -> inspect.Signature:
    """``fn``'s signature, after checking that each of its parameters (but ``ignore``) has a row in ``table``."""
    signature = inspect.signature(fn)
    missing = [p for p in signature.parameters if p not in table and p not in ignore]
    if missing:
        raise TypeError(f"{fn.__qualname__}: no Setting row for parameter(s) {', '.join(missing)}")
    return signature


def checked(table: dict[str, Setting]):
    """Decorator: every call checks its arguments' names and values against ``table`` (and passes them on as
    ``Setting.check`` returns them).

    Every parameter of the function needs a row (checked when the decorator is applied). Arguments left at their
    defaults are not checked: the defaults are valid by construction."""

    def decorate(fn):
        signature = require_rows(fn, table)
        where = f"{fn.__name__}(): "

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            check_names(kwargs, signature.parameters, where)
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as e:
                raise SettingError(f"{where}{e}") from None
            for name, value in bound.arguments.items():
                bound.arguments[name] = table[name].check(name, value, where)
            return fn(*bound.args, **bound.kwargs)

        return wrapper

    return decorate
