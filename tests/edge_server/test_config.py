"""EdgeConfig.from_toml: every value of edge.toml is type-checked and named when wrong."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from edge_server.config import _TOML_CHECKS, EdgeConfig
from shared.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


def test_every_setting_has_a_check() -> None:
    assert set(_TOML_CHECKS) == {f.name for f in fields(EdgeConfig)}


def test_a_valid_file_loads(tmp_path: Path) -> None:
    config = EdgeConfig.from_toml(write(tmp_path, (
        '[server]\nhost = "0.0.0.0"\nport = 9000\nmetrics_port = 9100\nping_interval_s = 5\n'
        '[engine]\nmax_batch_rows = 4\nbatching = false\nthreads = 2\n'
        '[scheduler]\nsteps = 12\nsplit_fraction = 0.25\nsampler = "euler"\nguidance = 5\nscheduler = "linucb"\n'
        'alpha = 0.2\n'
        '[limits]\nmax_steps = 50\nallowed_sizes = [[64, 64]]\n'
    )))
    assert (config.host, config.port, config.metrics_port, config.max_batch_rows, config.batching) == (
        "0.0.0.0", 9000, 9100, 4, False)
    assert (config.steps, config.split_fraction, config.sampler, config.scheduler) == (12, 0.25, "euler", "linucb")
    assert config.guidance == 5.0 and isinstance(config.guidance, float)
    assert config.ping_interval_s == 5.0 and config.limits == {"max_steps": 50, "allowed_sizes": [[64, 64]]}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[server]\nport = "9000"\n', "port: expected an integer, got str"),
        ("[server]\nport = 70000\n", "port: expected an integer in [0, 65535], got 70000"),
        ('[server]\nhost = 1\n', "host: expected a string, got int"),
        ('[server]\nhost = ""\n', "host: expected 1-4096 characters"),
        ("[engine]\nmax_batch_rows = true\n", "max_batch_rows: expected an integer, got bool"),
        ("[engine]\nmax_batch_rows = 0\n", "max_batch_rows: expected an integer >= 1, got 0"),
        ('[engine]\nmax_batch_rows = "many"\n', "max_batch_rows: expected auto or an integer >= 1, got 'many'"),
        ("[engine]\nmax_queue = 1.5\n", "max_queue: expected an integer, got float"),
        ('[engine]\nbatching = "yes"\n', "batching: expected true or false, got str"),
        ("[engine]\nbatching = 1\n", "batching: expected true or false, got int"),
        # the bound requests meet (the protocol's max_steps), not the relay plan's own 1000
        ("[scheduler]\nsteps = 0\n", "steps: expected an integer in [1, 100], got 0 (the [limits] max_steps)"),
        ("[scheduler]\nsteps = 60\n[limits]\nmax_steps = 50\n", "steps: expected an integer in [1, 50], got 60"),
        ('[scheduler]\nsteps = "20"\n', "steps: expected an integer, got str"),
        ('[scheduler]\nscheduler = "foo"\n', "scheduler: expected one of auto, fixed, linucb, linucb_disjoint, "),
        ("[scheduler]\nsplit_fraction = 1.5\n", "split_fraction: expected a finite number in [0, 1], got 1.5"),
        ("[scheduler]\nsplit_fraction = nan\n", "split_fraction: expected a finite number in [0, 1], got nan"),
        ("[scheduler]\nguidance = inf\n", "guidance: expected a finite number"),
        ('[scheduler]\nsampler = "pndm"\n', "sampler: expected one of"),
        ("[scheduler]\nalpha = [0.1]\n", "alpha: expected a number, got list"),
        ("[server]\nrequest_timeout_s = 0\n", "request_timeout_s: expected a finite number > 0, got 0"),
        ("[server]\ntoken_file = 1979-05-27\n", "token_file: expected a string, got datetime.date"),
        ("limits = 3\n", "limits: expected an object, got int"),
        ("[limits]\nmax_steps = true\n", "limits: max_steps: expected an integer, got bool"),
        ("[limits]\nmax_stepz = 5\n", "limits: unknown limit 'max_stepz'"),
        ("[server]\nmax_connections = 0\n", "max_connections: expected an integer in [1, 1000000], got 0"),
        ('[server]\nmax_connections_per_peer = "8"\n', "max_connections_per_peer: expected an integer, got str"),
        ("[server]\nsend_timeout_s = 0\n", "send_timeout_s: expected a finite number in (0, 86400], got 0"),
        ("[limits]\nhello_timeout_s = 0\n", "limits: hello_timeout_s: expected a finite number in (0, 86400]"),
        ("[limits]\nframe_burst = 0\n", "limits: frame_burst: expected an integer in [1, 1000000], got 0"),
        ("[limits]\nmax_outbox_bytes = 10\n", "limits: max_outbox_bytes: expected an integer in [1024, "),
    ],
)
def test_a_wrong_value_is_a_config_error_naming_the_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        EdgeConfig.from_toml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message, message


def test_unknown_settings_and_unreadable_files_are_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'max_btach_rows'"):
        EdgeConfig.from_toml(write(tmp_path, "[engine]\nmax_btach_rows = 4\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        EdgeConfig.from_toml(write(tmp_path, "port = \n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        EdgeConfig.from_toml(tmp_path / "missing.toml")


def test_flood_settings_load_from_the_file_and_flags_override_them(tmp_path: Path) -> None:
    from edge_server.config import config_from_args
    from edge_server.daemon import build_parser

    path = write(tmp_path, "[server]\nmax_connections = 64\nsend_timeout_s = 5\n"
                           "[limits]\nhello_timeout_s = 2.5\nframes_per_s = 50\nmax_refusals = 8\n")
    config = EdgeConfig.from_toml(path)
    assert (config.max_connections, config.max_connections_per_peer, config.send_timeout_s) == (64, 128, 5.0)
    args = build_parser().parse_args(
        ["serve", "--family", "f", "--config", str(path), "--max-connections-per-peer", "4", "--hello-timeout", "1",
         "--frame-burst", "30", "--refusals-per-minute", "10", "--max-outbox-bytes", "65536", "--send-timeout", "9"])
    config = config_from_args(args)
    assert (config.max_connections, config.max_connections_per_peer, config.send_timeout_s) == (64, 4, 9.0)
    assert config.limits == {"hello_timeout_s": 1.0, "frames_per_s": 50, "max_refusals": 8, "frame_burst": 30,
                             "refusals_per_minute": 10.0, "max_outbox_bytes": 65536}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-connections", "0"], "--max-connections: expected an integer in [1, 1000000], got 0"),
        (["--send-timeout", "-1"], "--send-timeout: expected a finite number in (0, 86400], got -1.0"),
        (["--hello-timeout", "0"], "--hello-timeout: hello_timeout_s: expected a finite number in (0, 86400], got 0.0"),
        (["--frames-per-s", "nan"], "--frames-per-s: frames_per_s: expected a finite number"),
        (["--max-refusals", "0"], "--max-refusals: max_refusals: expected an integer in [1, 1000000], got 0"),
    ],
)
def test_a_bad_flood_flag_is_one_line_naming_the_flag(flags: list[str], message: str) -> None:
    from edge_server.config import config_from_args
    from edge_server.daemon import build_parser

    with pytest.raises(ConfigError) as info:
        config_from_args(build_parser().parse_args(["serve", "--family", "f", *flags]))
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def _serve_args(*flags: str) -> EdgeConfig:
    from edge_server.config import config_from_args
    from edge_server.daemon import build_parser

    return config_from_args(build_parser().parse_args(["serve", "--family", "f", *flags]))


def _serve_help() -> str:
    """What ``rise-edge serve --help`` prints for the flags, argparse's line wrapping undone."""
    import contextlib
    import io

    from edge_server.daemon import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--help"])
    assert exited.value.code == 0
    return " ".join(out.getvalue().split("options:", 1)[1].split())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # the limit requests meet (the protocol's max_steps, 100 unless [limits] says otherwise), not 1000
        (["--steps", "0"], "--steps: expected an integer in [1, 100], got 0"),
        (["--steps", "101"], "--steps: expected an integer in [1, 100], got 101"),
        (["--threads", "0"], "--threads: expected an integer >= 1, got 0"),
        (["--port", "70000"], "--port: expected an integer in [0, 65535], got 70000"),
        (["--split-fraction", "2"], "--split-fraction: expected a finite number in [0, 1], got 2.0"),
    ],
)
def test_a_bad_flag_is_one_line_naming_the_flag_and_the_real_bound(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _serve_args(*flags)
    assert str(info.value) == message


def test_an_unknown_scheduler_names_the_same_choices_as_help() -> None:
    from edge_server.config import SCHEDULER_CHOICES

    with pytest.raises(ConfigError) as info:
        _serve_args("--scheduler", "foo")
    message = str(info.value)
    assert message.startswith("--scheduler: expected one of ") and "needs --profile" not in message
    listed = message.removeprefix("--scheduler: expected one of ").split(" or ")[0].split(", ")
    assert tuple(listed) == SCHEDULER_CHOICES
    assert f"--scheduler SCHEDULER {', '.join(SCHEDULER_CHOICES)}, or one arm" in _serve_help()
    assert _serve_args("--scheduler", "N20k10e").scheduler == "N20k10e"  # an arm label is a name too


def test_help_shows_the_defaults_the_config_has() -> None:
    text = _serve_help()
    defaults = EdgeConfig()
    for flag, value in (("--port PORT", defaults.port), ("--host HOST", defaults.host),
                        ("--max-queue MAX_QUEUE", defaults.max_queue), ("--steps STEPS", defaults.steps),
                        ("--max-connections MAX_CONNECTIONS", defaults.max_connections)):
        after = text.split(flag, 1)[1]
        assert f"(default: {value})" in after.split(" --", 1)[0], (flag, after[:200])


def test_dtype_names_are_the_ones_placement_knows() -> None:
    from edge_server.config import DTYPE_CHOICES
    from edge_server.placement import DTYPE_CHOICES as PLACEMENT_DTYPES

    assert DTYPE_CHOICES == PLACEMENT_DTYPES


@pytest.mark.parametrize(
    ("host", "token", "tls", "expected"),
    [
        ("127.0.0.1", False, False, None),
        ("localhost", False, False, None),
        ("::1", False, False, None),
        ("0.0.0.0", False, False, "with no token and no TLS"),
        ("::", False, False, "with no token and no TLS"),
        ("192.168.1.20", True, False, "without TLS"),
        ("edge.example.org", False, True, "with no token: anyone who reaches the port"),
        ("0.0.0.0", True, True, None),
    ],
)
def test_an_exposed_host_without_token_or_tls_is_warned_about(tmp_path: Path, host: str, token: bool, tls: bool,
                                                              expected: str | None) -> None:
    token_file = tmp_path / "edge.token"
    token_file.write_text("tok3n\n")
    token_file.chmod(0o600)
    config = EdgeConfig(host=host, token_file=str(token_file) if token else None,
                        tls_cert="cert.pem" if tls else None, tls_key="key.pem" if tls else None)
    warnings = config.warnings()
    if expected is None:
        assert warnings == []
    else:
        [warning] = warnings
        assert expected in warning and f"{host}:8765" in warning and "\n" not in warning


@pytest.mark.parametrize(("mode", "readers"), [(0o600, None), (0o640, "its group"), (0o604, "every user"),
                                               (0o644, "its group and every user")])
def test_a_token_file_others_can_read_is_warned_about(tmp_path: Path, mode: int, readers: str | None) -> None:
    token_file = tmp_path / "edge.token"
    token_file.write_text("tok3n\n")
    token_file.chmod(mode)
    warnings = EdgeConfig(token_file=str(token_file)).warnings()
    if readers is None:
        assert warnings == []
    else:
        assert warnings == [f"token file {token_file} is readable by {readers} (chmod 600 {token_file})"]


def test_max_batch_rows_is_auto_unless_set_in_the_file_or_by_a_flag(tmp_path: Path) -> None:
    from edge_server.daemon import build_parser, config_from_args
    from edge_server.service import make_planner

    assert EdgeConfig().max_batch_rows is None  # auto: edge_server.row_budget
    assert EdgeConfig.from_toml(write(tmp_path, '[engine]\nmax_batch_rows = "auto"\n')).max_batch_rows is None

    def flags(*extra: str) -> EdgeConfig:
        return config_from_args(build_parser().parse_args(["serve", "--family", "f", *extra]))

    assert flags("--max-batch-rows", "24").max_batch_rows == 24
    path = write(tmp_path, "[engine]\nmax_batch_rows = 8\n")
    assert flags("--config", str(path)).max_batch_rows == 8
    assert flags("--config", str(path), "--max-batch-rows", "auto").max_batch_rows is None  # the flag wins
    for wrong, said in (("eight", "'eight'"), ("0", "got 0"), ("-2", "'-2'")):
        with pytest.raises(ConfigError, match=f"--max-batch-rows: expected auto or an integer >= 1, got {said}"
                           if said != "got 0" else "--max-batch-rows: expected an integer >= 1, got 0"):
            flags("--max-batch-rows", wrong)
    assert "(default: auto)" in build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    profile = str(Path(__file__).parents[2] / "models/demo/family/profile.json")
    auto = make_planner(EdgeConfig(scheduler="linucb", profile=profile))
    assert auto.edge_capacity == 8  # type: ignore[attr-defined]  # before a measurement: the CPU's 16 rows
    assert make_planner(EdgeConfig(scheduler="linucb", profile=profile, max_batch_rows=4)).edge_capacity == 2  # type: ignore[attr-defined]
