"""shared.validation: the one home of checks of untrusted input."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared import validation
from shared.errors import ConfigError, HandoffError
from shared.handoff import HandoffInvalid
from shared.protocol import ProtocolError
from shared.validation import (
    check_family_id,
    check_float,
    check_identifier,
    check_int,
    check_str,
    finite_array,
    load_versioned_json,
    loads_strict,
    read_bool,
    read_float,
    read_int,
    read_list,
    read_mapping,
    read_str,
    show,
    write_json_atomic,
    write_text_atomic,
)


class Oops(Exception):
    """A caller's own error type, not a RiseError: built from the message alone."""


def message_of(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------------- readers


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "steps: expected an integer, got bool"),
        (False, "steps: expected an integer, got bool"),
        (3.0, "steps: expected an integer, got float"),
        ("3", "steps: expected an integer, got str"),
        (None, "steps: expected an integer, got NoneType"),
        (0, "steps: expected an integer in [1, 100], got 0"),
        (101, "steps: expected an integer in [1, 100], got 101"),
    ],
)
def test_read_int_refuses_bools_other_types_and_out_of_range(value: Any, message: str) -> None:
    with pytest.raises(Oops) as info:
        read_int({"steps": value}, "steps", lo=1, hi=100, error=Oops)
    assert message_of(info) == message


def test_read_int_accepts_exact_ints_and_names_missing_keys() -> None:
    assert read_int({"steps": 7}, "steps", lo=1, hi=100, error=Oops) == 7
    assert read_int({"n": 2**70}, "n", lo=0, error=Oops) == 2**70  # only the given bounds
    with pytest.raises(Oops, match=r"^state\.steps: expected an integer \(a required field\), got nothing$"):
        read_int({}, "steps", where="state", error=Oops)
    assert read_int({}, "steps", optional=True, error=Oops) is None
    assert read_int({"steps": None}, "steps", optional=True, error=Oops) is None
    with pytest.raises(Oops, match="got NoneType"):
        read_int({"steps": None}, "steps", error=Oops)
    with pytest.raises(Oops, match=r"expected an integer >= 1, got 0"):
        check_int("n", 0, lo=1, error=Oops)
    with pytest.raises(Oops, match=r"expected an integer <= 9, got 10"):
        check_int("n", 10, hi=9, error=Oops)
    with pytest.raises(Oops, match=re.escape("[0, 18446744073709551615]")):  # int bounds in full, not 1.8e+19
        check_int("seed", -1, lo=0, hi=2**64 - 1, error=Oops)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "g: expected a number, got bool"),
        ("7.5", "g: expected a number, got str"),
        ([1.0], "g: expected a number, got list"),
        (math.nan, "g: expected a finite number in [0, 50], got nan"),
        (math.inf, "g: expected a finite number in [0, 50], got inf"),
        (10**400, "g: expected a finite number in [0, 50], got "),  # beyond float range: no OverflowError
        (-0.5, "g: expected a finite number in [0, 50], got -0.5"),
        (50.5, "g: expected a finite number in [0, 50], got 50.5"),
    ],
)
def test_read_float_refuses_bools_nan_and_out_of_range(value: Any, message: str) -> None:
    with pytest.raises(Oops) as info:
        read_float({"g": value}, "g", lo=0.0, hi=50.0, error=Oops)
    assert message_of(info).startswith(message)


def test_read_float_returns_floats_and_honours_open_bounds() -> None:
    got = read_float({"g": 3}, "g", lo=0.0, error=Oops)
    assert got == 3.0 and type(got) is float
    assert read_float({"g": 0.0}, "g", lo=0.0, error=Oops) == 0.0
    with pytest.raises(Oops, match=re.escape("bw: expected a finite number > 0, got 0")):
        read_float({"bw": 0}, "bw", lo=0.0, lo_open=True, error=Oops)
    with pytest.raises(Oops, match=re.escape("x: expected a finite number <= 1, got 2")):
        check_float("x", 2, hi=1.0, error=Oops)
    with pytest.raises(Oops, match="x: expected a finite number, got nan"):
        check_float("x", math.nan, error=Oops)  # finite even without bounds
    assert read_float({}, "g", optional=True, error=Oops) is None


def test_read_bool_str_list_mapping() -> None:
    assert read_bool({"b": False}, "b", error=Oops) is False
    for value, name in ((1, "int"), ("true", "str"), (None, "NoneType")):
        with pytest.raises(Oops, match=f"^b: expected true or false, got {name}$"):
            read_bool({"b": value}, "b", error=Oops)
    assert read_str({"s": "abc"}, "s", max_len=3, error=Oops) == "abc"
    with pytest.raises(Oops, match="^s: expected a string, got int$"):
        read_str({"s": 3}, "s", error=Oops)
    with pytest.raises(Oops, match=re.escape("s: expected 1-3 characters, got 'abcd'")):
        read_str({"s": "abcd"}, "s", min_len=1, max_len=3, error=Oops)
    with pytest.raises(Oops, match=re.escape("s: expected 1-8 printable characters, got 'a\\nb'")):
        check_str("s", "a\nb", min_len=1, max_len=8, printable=True, error=Oops)
    with pytest.raises(Oops, match=re.escape("s: expected a string matching [a-z]+, got 'A'")):
        read_str({"s": "A"}, "s", pattern=re.compile("[a-z]+"), error=Oops)
    assert read_list({"l": [1, 2]}, "l", max_len=2, error=Oops) == [1, 2]
    with pytest.raises(Oops, match="^l: expected a list, got tuple$"):
        read_list({"l": (1, 2)}, "l", error=Oops)
    with pytest.raises(Oops, match=re.escape("l: expected a list of at most 1 items, got 2 items")):
        read_list({"l": [1, 2]}, "l", max_len=1, error=Oops)
    assert read_mapping({"m": {"a": 1}}, "m", error=Oops) == {"a": 1}
    with pytest.raises(Oops, match="^m: expected an object, got list$"):
        read_mapping({"m": []}, "m", error=Oops)
    with pytest.raises(Oops, match="^doc: expected an object, got list$"):
        read_int([], "n", where="doc", error=Oops)  # type: ignore[arg-type]


def test_messages_echo_peer_values_as_short_ascii() -> None:
    with pytest.raises(Oops) as info:
        read_str({"s": "é" * 500}, "s", max_len=4, error=Oops)
    assert message_of(info).isascii() and len(message_of(info)) < 200
    assert show("x" * 1000, 20) == "'" + "x" * 16 + "..."
    assert show(10**5000).startswith("<int")  # more digits than str() allows


def test_finite_array() -> None:
    got = finite_array("A", [[1, 2], [3, 4]], (2, 2), error=Oops)
    assert got.dtype == np.float64 and got.shape == (2, 2)
    with pytest.raises(Oops, match=re.escape("A: expected shape (2, 2), got shape (2,)")):
        finite_array("A", [1, 2], (2, 2), error=Oops)
    with pytest.raises(Oops, match=re.escape("A: expected finite numbers, got 1 NaN/Inf of 2")):
        finite_array("A", [1, math.nan], (2,), error=Oops)
    for bad in ("12", None, {"a": 1}, [[1], [2, 3]], ["a", "b"]):
        with pytest.raises(Oops, match=r"^A: expected an array of numbers of shape \(2,\)"):
            finite_array("A", bad, (2,), error=Oops)


# --------------------------------------------------------------------------- error types and kinds


def test_each_caller_keeps_its_error_type_and_codes() -> None:
    with pytest.raises(ProtocolError) as info:
        check_int("steps", True, lo=1, hi=10, error=ProtocolError)
    assert (info.value.code, info.value.field) == ("bad_message", "steps")  # a wrong type: the peer's bug
    with pytest.raises(ProtocolError) as info:
        check_int("steps", 11, lo=1, hi=10, error=ProtocolError)
    assert (info.value.code, info.value.field) == ("invalid_request", "steps")  # out of range: the input's
    with pytest.raises(ProtocolError) as info:
        check_identifier("request_id", "a b", error=ProtocolError)
    assert (info.value.code, info.value.field) == ("bad_message", "request_id")
    with pytest.raises(HandoffInvalid) as hinfo:
        check_float("guidance_scale", math.nan, error=HandoffInvalid)
    assert isinstance(hinfo.value, HandoffError) and hinfo.value.field == "guidance_scale"
    with pytest.raises(ConfigError, match="^port: expected an integer, got str$"):
        check_int("port", "80", error=ConfigError)


@pytest.mark.parametrize("family_id", ["", " sd15", "sd15 ", "a\nb", "x" * 129, 7, None])
def test_one_family_id_rule(family_id: Any) -> None:
    with pytest.raises(Oops, match="^family_id: expected a (string|non-empty printable string of at most 128)"):
        check_family_id("family_id", family_id, error=Oops)


def test_family_ids_that_pass() -> None:
    for family_id in ("sd15", "demo-tiny/v2", "SDXL 1.0", "x" * 128):
        assert check_family_id("family_id", family_id, error=Oops) == family_id


# --------------------------------------------------------------------------- strict JSON


@pytest.mark.parametrize(
    ("text", "fragment"),
    [('{"a": NaN}', "NaN"), ('{"a": Infinity}', "Infinity"), ('{"a": 1, "a": 2}', "duplicate key"),
     ("[" * 100_000 + "]" * 100_000, "JSON"), ("{not json", "Expecting")],
)
def test_loads_strict_refuses_what_standard_json_does_not_allow(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        loads_strict(text)


def test_loads_strict_reads_standard_json() -> None:
    assert loads_strict('{"a": [1, 2.5, null, true]}') == {"a": [1, 2.5, None, True]}
    assert loads_strict(b'{"a": 1}') == {"a": 1}


# --------------------------------------------------------------------------- files


def test_write_json_atomic_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    write_json_atomic(path, {"format": "k", "version": 1, "x": [1, 2]})
    assert json.loads(path.read_text()) == {"format": "k", "version": 1, "x": [1, 2]}
    assert path.stat().st_mode & 0o777 == 0o600
    write_json_atomic(path, {"format": "k", "version": 1, "x": []}, indent=2, mode=0o644)
    assert json.loads(path.read_text())["x"] == [] and path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"old": True})

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(validation.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        write_json_atomic(path, {"old": False})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # the temporary is gone too
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is written
        write_json_atomic(path, {"x": math.nan})
    with pytest.raises(TypeError):
        write_text_atomic(path, 42)  # type: ignore[arg-type]
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    stale = tmp_path / ".state.json.abc123.tmp"
    stale.write_text("half")
    write_text_atomic(path, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_versioned_json_checks_kind_and_version(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"format": "rise-thing", "version": 2, "x": 1})
    assert load_versioned_json(path, "rise-thing", 2, error=Oops)["x"] == 1
    with pytest.raises(Oops, match=r"version: expected 1 \(the thing version this code reads\), got 2"):
        load_versioned_json(path, "rise-thing", 1, what="thing", error=Oops)
    with pytest.raises(Oops, match=r"format: expected 'rise-other'.*got 'rise-thing'"):
        load_versioned_json(path, "rise-other", 2, error=Oops)
    for doc in ({"format": "rise-thing", "version": True}, {"format": "rise-thing", "version": 2.0},
                {"format": "rise-thing"}):
        write_json_atomic(path, doc)
        with pytest.raises(Oops, match="version"):
            load_versioned_json(path, "rise-thing", 1, error=Oops)
    write_json_atomic(path, [1, 2])
    with pytest.raises(Oops, match="got list"):
        load_versioned_json(path, "rise-thing", 1, error=Oops)
    path.write_text('{"format": "rise-thing", "version": 1, "x": NaN}')
    with pytest.raises(Oops, match="not valid JSON"):
        load_versioned_json(path, "rise-thing", 1, error=Oops)
    with pytest.raises(Oops, match="cannot read thing .*; try this"):
        load_versioned_json(tmp_path / "none.json", "rise-thing", 1, what="thing", hint="try this", error=Oops)


def test_the_module_needs_no_numpy_to_import() -> None:
    import subprocess
    import sys

    code = "import sys, shared.validation; sys.exit('numpy' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo, env={**os.environ}).returncode == 0
