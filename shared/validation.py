"""Checks of untrusted input in one place: typed field checks, strict JSON, versioned JSON files.

Standard library only (numpy is imported by :func:`finite_array` alone), so any module may use it.

Everything a peer, a file or a config can hand RISE goes through these functions, so the rules
(a bool is not an int, numbers are finite, strings are bounded, what a family id may be) are
written once. Every check raises the *caller's* error type, with a message of the form
``"<field>: expected <what>, got <what>"`` that echoes peer values only through :func:`show`.

* ``check_*(field, value, ...)`` check a value already in hand (a dataclass field, a list item);
* ``read_*(obj, key, ...)`` read ``obj[key]`` from a mapping and check it (a missing key fails too,
  unless ``optional=True``, which also lets ``null`` through as ``None``);
* :func:`loads_strict` parses standard JSON only; :func:`write_json_atomic` and
  :func:`load_versioned_json` write and read the versioned JSON files that persist state.

``error`` is an exception class. A :class:`~shared.errors.RiseError` subclass builds the
exception with :meth:`~shared.errors.RiseError.for_field` (so the wire protocol can pick its
error code from the failure's kind: a wrong type, a malformed value, or one out of range);
any other class is called with the message.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import stat
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeGuard, overload

from shared.errors import ConfigError, FieldFailure, RiseError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "IDENTIFIER",
    "MAX_ID_CHARS",
    "check_bool",
    "check_choice",
    "check_family_id",
    "check_float",
    "check_identifier",
    "check_int",
    "check_list",
    "check_mapping",
    "check_str",
    "check_versioned",
    "fail",
    "finite_array",
    "is_int",
    "is_number",
    "load_json",
    "load_versioned_json",
    "loads_strict",
    "read_bool",
    "read_float",
    "read_int",
    "read_list",
    "read_mapping",
    "read_str",
    "show",
    "type_name",
    "write_json_atomic",
    "write_text_atomic",
]

#: The longest family id (and handoff request id) anyone accepts.
MAX_ID_CHARS = 128
#: Request ids, scheduler names, device classes: 1-64 characters, safe in logs and file names.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}", re.ASCII)

_MISSING = "nothing"  # what a message says was given for an absent key


# --------------------------------------------------------------------------- failing


def fail(error: type[Exception], field: str, expected: str, got: str, *, kind: FieldFailure = "range") -> NoReturn:
    """Raise ``error`` with ``"<field>: expected <expected>, got <got>"``."""
    message = f"{field}: expected {expected}, got {got}"
    if issubclass(error, RiseError):
        raise error.for_field(message, field=field, kind=kind)
    raise error(message)


def type_name(value: object) -> str:
    """The name of ``value`` 's type, qualified unless it is a builtin (``int``, ``numpy.ndarray``)."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def show(value: object, limit: int = 80) -> str:
    """A short ASCII repr, safe to put in an error message that echoes peer input."""
    try:
        text = ascii(value)
    except ValueError:  # an int with more digits than str() allows
        text = f"<{type_name(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- predicates


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool`` (JSON ``true`` must never pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_integral(value: object) -> bool:
    """An integer of any integral type (numpy's included) that is not a ``bool``: for in-process values."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number of any type (numpy's included) that is not a ``bool``: for in-process values."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """An ``int`` or ``float`` that is not a ``bool`` (finite or not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- value checks


def _num(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"  # ints in full: 2**64 - 1 is not 1.8e+19


def _bounds(lo: float | None, hi: float | None, *, lo_open: bool = False, hi_open: bool = False) -> str:
    """`` in [lo, hi]``, `` >= lo``, `` <= hi`` or nothing, as the bounds given."""
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {_num(hi)}"
    return ""


def _size(min_len: int, max_len: int | None) -> str:
    """``1-64``, ``at most 8``, ``at least 1`` or ``any number of``."""
    if max_len is None:
        return f"at least {min_len}" if min_len else "any number of"
    return f"{min_len}-{max_len}" if min_len else f"at most {max_len}"


def check_int(field: str, value: Any, *, lo: int | None = None, hi: int | None = None,
              error: type[Exception]) -> int:
    """``value`` if it is an int (not a bool) in ``[lo, hi]`` (either bound may be open-ended)."""
    if not is_int(value):
        fail(error, field, "an integer", type_name(value), kind="type")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(error, field, "an integer" + _bounds(lo, hi), show(value))
    return int(value)


def check_float(field: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, error: type[Exception]) -> float:
    """``value`` as a finite float, if it is an int or float (not a bool) within the bounds."""
    if not is_number(value):
        fail(error, field, "a number", type_name(value), kind="type")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        fail(error, field, "a finite number" + _bounds(lo, hi, lo_open=lo_open, hi_open=hi_open), show(value))
    below = lo is not None and (number <= lo if lo_open else number < lo)
    above = hi is not None and (number >= hi if hi_open else number > hi)
    if below or above:
        fail(error, field, "a finite number" + _bounds(lo, hi, lo_open=lo_open, hi_open=hi_open), show(value))
    return number


def check_bool(field: str, value: Any, *, error: type[Exception]) -> bool:
    """``value`` if it is a bool (not 0/1, not ``"true"``)."""
    if not isinstance(value, bool):
        fail(error, field, "true or false", type_name(value), kind="type")
    return value


def check_str(field: str, value: Any, *, min_len: int = 0, max_len: int | None = None, printable: bool = False,
              pattern: re.Pattern[str] | None = None, error: type[Exception]) -> str:
    """``value`` if it is a str of ``min_len``..``max_len`` characters (printable / matching ``pattern``)."""
    if not isinstance(value, str):
        fail(error, field, "a string", type_name(value), kind="type")
    too_long = max_len is not None and len(value) > max_len
    if len(value) < min_len or too_long or (printable and not value.isprintable()):
        size = _size(min_len, max_len)
        fail(error, field, f"{size} {'printable ' if printable else ''}characters", show(value), kind="format")
    if pattern is not None and not pattern.fullmatch(value):
        fail(error, field, f"a string matching {pattern.pattern}", show(value), kind="format")
    return value


def check_choice(field: str, value: Any, choices: Collection[str], *, error: type[Exception]) -> str:
    """``value`` if it is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        fail(error, field, f"one of {list(choices)}", show(value), kind="format")
    return value


def check_identifier(field: str, value: Any, *, error: type[Exception]) -> str:
    """A request id, scheduler name or device class: :data:`IDENTIFIER`."""
    if not isinstance(value, str):
        fail(error, field, "a string", type_name(value), kind="type")
    if not IDENTIFIER.fullmatch(value):
        fail(error, field, "1-64 characters of [A-Za-z0-9._:-], starting alphanumeric", show(value), kind="format")
    return value


def check_family_id(field: str, value: Any, *, error: type[Exception]) -> str:
    """A model family id: 1-:data:`MAX_ID_CHARS` printable characters, no outer spaces (wire and bundle alike)."""
    if not isinstance(value, str):
        fail(error, field, "a string", type_name(value), kind="type")
    if not (0 < len(value) <= MAX_ID_CHARS and value.isprintable() and value.strip() == value):
        expected = f"a non-empty printable string of at most {MAX_ID_CHARS} characters, no outer spaces"
        fail(error, field, expected, show(value), kind="format")
    return value


def check_list(field: str, value: Any, *, min_len: int = 0, max_len: int | None = None,
               error: type[Exception]) -> list[Any]:
    """``value`` if it is a list (a JSON array) of ``min_len``..``max_len`` items."""
    if not isinstance(value, list):
        fail(error, field, "a list", type_name(value), kind="type")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        fail(error, field, f"a list of {_size(min_len, max_len)} items", f"{len(value)} items")
    return value


def check_mapping(field: str, value: Any, *, error: type[Exception]) -> dict[str, Any]:
    """``value`` if it is a dict with string keys (a JSON object)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        fail(error, field, "an object", type_name(value), kind="type")
    return value


def finite_array(field: str, value: Any, shape: tuple[int, ...], *, error: type[Exception]) -> np.ndarray:
    """``value`` (nested lists) as a float64 array of exactly ``shape`` with finite entries."""
    import numpy as np  # here, not above: the bundle manifest imports this module and numpy-free devices read it

    if isinstance(value, (str, bytes, dict)) or value is None:  # np.asarray would make 0-d arrays of them
        fail(error, field, f"an array of numbers of shape {shape}", type_name(value), kind="type")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        fail(error, field, f"an array of numbers of shape {shape}", show(str(exc)), kind="type")
    if array.shape != shape:
        fail(error, field, f"shape {shape}", f"shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        fail(error, field, "finite numbers", f"{bad} NaN/Inf of {array.size}")
    return array


# --------------------------------------------------------------------------- mapping readers


def _get(obj: Mapping[str, Any], key: str, where: str | None, error: type[Exception]) -> tuple[str, Any, bool]:
    """The field's name, ``obj[key]`` (or None) and whether the key is present."""
    field = f"{where}.{key}" if where else key
    if not isinstance(obj, Mapping):
        fail(error, where or "document", "an object", type_name(obj), kind="type")
    return field, obj.get(key), key in obj


def _required(field: str, present: bool, expected: str, error: type[Exception]) -> None:
    if not present:
        fail(error, field, f"{expected} (a required field)", _MISSING, kind="type")


@overload
def read_int(obj: Mapping[str, Any], key: str, *, lo: int | None = ..., hi: int | None = ...,
             optional: Literal[False] = ..., where: str | None = ..., error: type[Exception]) -> int: ...
@overload
def read_int(obj: Mapping[str, Any], key: str, *, lo: int | None = ..., hi: int | None = ...,
             optional: Literal[True], where: str | None = ..., error: type[Exception]) -> int | None: ...
def read_int(obj: Mapping[str, Any], key: str, *, lo: int | None = None, hi: int | None = None,
             optional: bool = False, where: str | None = None, error: type[Exception]) -> int | None:
    """``obj[key]`` checked by :func:`check_int`; ``where`` prefixes the field name (``"state.updates"``)."""
    field, value, present = _get(obj, key, where, error)
    if optional and value is None:
        return None
    _required(field, present, "an integer", error)
    return check_int(field, value, lo=lo, hi=hi, error=error)


@overload
def read_float(obj: Mapping[str, Any], key: str, *, lo: float | None = ..., hi: float | None = ...,
               lo_open: bool = ..., optional: Literal[False] = ..., where: str | None = ...,
               error: type[Exception]) -> float: ...
@overload
def read_float(obj: Mapping[str, Any], key: str, *, lo: float | None = ..., hi: float | None = ...,
               lo_open: bool = ..., optional: Literal[True], where: str | None = ...,
               error: type[Exception]) -> float | None: ...
def read_float(obj: Mapping[str, Any], key: str, *, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, optional: bool = False, where: str | None = None,
               error: type[Exception]) -> float | None:
    """``obj[key]`` checked by :func:`check_float` (finite, within the bounds)."""
    field, value, present = _get(obj, key, where, error)
    if optional and value is None:
        return None
    _required(field, present, "a number", error)
    return check_float(field, value, lo=lo, hi=hi, lo_open=lo_open, error=error)


@overload
def read_bool(obj: Mapping[str, Any], key: str, *, optional: Literal[False] = ..., where: str | None = ...,
              error: type[Exception]) -> bool: ...
@overload
def read_bool(obj: Mapping[str, Any], key: str, *, optional: Literal[True], where: str | None = ...,
              error: type[Exception]) -> bool | None: ...
def read_bool(obj: Mapping[str, Any], key: str, *, optional: bool = False, where: str | None = None,
              error: type[Exception]) -> bool | None:
    """``obj[key]`` checked by :func:`check_bool`."""
    field, value, present = _get(obj, key, where, error)
    if optional and value is None:
        return None
    _required(field, present, "true or false", error)
    return check_bool(field, value, error=error)


@overload
def read_str(obj: Mapping[str, Any], key: str, *, min_len: int = ..., max_len: int | None = ...,
             printable: bool = ..., pattern: re.Pattern[str] | None = ..., optional: Literal[False] = ...,
             where: str | None = ..., error: type[Exception]) -> str: ...
@overload
def read_str(obj: Mapping[str, Any], key: str, *, min_len: int = ..., max_len: int | None = ...,
             printable: bool = ..., pattern: re.Pattern[str] | None = ..., optional: Literal[True],
             where: str | None = ..., error: type[Exception]) -> str | None: ...
def read_str(obj: Mapping[str, Any], key: str, *, min_len: int = 0, max_len: int | None = None,
             printable: bool = False, pattern: re.Pattern[str] | None = None, optional: bool = False,
             where: str | None = None, error: type[Exception]) -> str | None:
    """``obj[key]`` checked by :func:`check_str`."""
    field, value, present = _get(obj, key, where, error)
    if optional and value is None:
        return None
    _required(field, present, "a string", error)
    return check_str(field, value, min_len=min_len, max_len=max_len, printable=printable, pattern=pattern,
                     error=error)


def read_list(obj: Mapping[str, Any], key: str, *, min_len: int = 0, max_len: int | None = None,
              where: str | None = None, error: type[Exception]) -> list[Any]:
    """``obj[key]`` checked by :func:`check_list`."""
    field, value, present = _get(obj, key, where, error)
    _required(field, present, "a list", error)
    return check_list(field, value, min_len=min_len, max_len=max_len, error=error)


def read_mapping(obj: Mapping[str, Any], key: str, *, where: str | None = None,
                 error: type[Exception]) -> dict[str, Any]:
    """``obj[key]`` checked by :func:`check_mapping`."""
    field, value, present = _get(obj, key, where, error)
    _required(field, present, "an object", error)
    return check_mapping(field, value, error=error)


# --------------------------------------------------------------------------- strict JSON


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of duplicate keys, other parsers (safetensors' Rust one) the first:
    # reject the ambiguity rather than read something the other side did not.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(f"duplicate key {show(key, 40)}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"non-standard JSON constant {name}")


def loads_strict(text: str | bytes) -> Any:
    """Standard JSON only: no NaN/Infinity, no duplicate keys. Raises ValueError on any failure."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:  # deep nesting
        raise ValueError("JSON nested too deeply") from None


# --------------------------------------------------------------------------- files


def write_text_atomic(path: str | Path, text: str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` atomically and durably: temp file + fsync + os.replace + fsync of the folder.

    A reader, or a process killed at any instant, sees the old complete file or the new one,
    never a mix; on any failure the old file is left as it was and the temporary removed.
    One writer per file: it removes stale temporaries a killed writer left behind.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = None, sort_keys: bool = False,
                      mode: int = 0o600) -> None:
    """Write ``obj`` as standard JSON (no NaN; compact unless ``indent``) with :func:`write_text_atomic`."""
    separators = (",", ":") if indent is None else None
    text = json.dumps(obj, allow_nan=False, indent=indent, sort_keys=sort_keys, separators=separators)
    write_text_atomic(path, text + "\n", mode=mode)


def check_versioned(doc: Any, kind: str, version: int, *, where: str, what: str | None = None,
                    error: type[Exception]) -> dict[str, Any]:
    """``doc`` if it is a JSON object with ``"format": kind`` and ``"version": version``; ``what`` names it."""
    what = what or kind
    if not isinstance(doc, dict):
        fail(error, where, f"a {what} (a JSON object with \"format\": {kind!r})", type_name(doc), kind="type")
    if doc.get("format") != kind:
        fail(error, f"{where}: format", f"{kind!r} (is it a {what}?)", show(doc.get("format")), kind="format")
    got = doc.get("version")
    if not is_int(got) or got != version:
        fail(error, f"{where}: version", f"{version} (the {what} version this code reads)", show(got), kind="format")
    return doc


def load_json(path: str | Path, *, what: str, hint: str | None = None, error: type[Exception]) -> Any:
    """The strict JSON (:func:`loads_strict`) in file ``path``; ``error`` names ``what`` it is (plus ``hint``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise error(f"cannot read {what} {path}: {reason}" + (f"; {hint}" if hint else "")) from None
    try:
        return loads_strict(text)
    except ValueError as exc:
        raise error(f"{what} {path} is not valid JSON: {show(str(exc), 200)}") from None


def load_versioned_json(path: str | Path, kind: str, version: int, *, what: str | None = None,
                        hint: str | None = None, error: type[Exception]) -> dict[str, Any]:
    """Read ``path`` (:func:`load_json`); it must be a ``kind`` document at ``version`` (:func:`check_versioned`)."""
    doc = load_json(path, what=what or kind, hint=hint, error=error)
    return check_versioned(doc, kind, version, where=str(path), what=what, error=error)


#: What a token may be: the wire protocol's rule (``hello.token``): printable ASCII without spaces.
MAX_TOKEN_CHARS = 512


def read_token_file(path: str | Path) -> tuple[str, bool]:
    """The bearer token in ``path`` (surrounding whitespace stripped) and whether every user may read the file.

    The edge and the device both keep their token in such a file. An unreadable file, or a token the
    protocol would refuse in every ``hello`` (see :func:`token_problem`), is a ConfigError saying what is
    wrong in one line (never showing the token).
    """
    path = Path(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    problem = token_problem(token)
    if problem is not None:
        raise ConfigError(f"token file {path}: {problem}")
    return token, bool(mode & stat.S_IROTH)


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token (1-512 printable ASCII characters, no spaces), or ``None``."""
    if not token:
        return "the token is empty"
    if len(token) > MAX_TOKEN_CHARS:
        return f"the token is {len(token)} characters long; at most {MAX_TOKEN_CHARS}"
    for i, char in enumerate(token, 1):
        if char.isspace():
            return f"the token has whitespace inside (character {i}); a token is one word of printable ASCII"
        if not "\x21" <= char <= "\x7e":
            return (f"the token has a non-printable or non-ASCII character (character {i}); "
                    "a token is printable ASCII")
    return None
