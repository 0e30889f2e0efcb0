"""What ``rise-edge serve`` is told: ``--config edge.toml`` and flags (flags win).

Imports nothing heavy (no torch): ``rise-edge serve --help`` and the checks of a config run before
any model library loads.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edge_server.listen import is_loopback
from shared.errors import ConfigError
from shared.protocol import ProtocolLimits
from shared.samplers import SAMPLER_NAMES
from shared.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_mapping,
    check_str,
    read_token_file,
)

#: ``--dtype`` names; :mod:`edge_server.placement` maps them to torch dtypes (a test checks the two agree).
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
#: ``--engine`` names: the batching engine in this process, or replicas of it on Ray Serve (edge_server.cluster).
ENGINE_CHOICES = ("local", "ray")

#: ``--scheduler`` names, besides one arm of the profile by label (:data:`ARM_LABEL`): ``auto`` is LinUCB over
#: a profile, else ``fixed``; every other name needs a profile (the shipped one or ``--profile``).
SCHEDULER_CHOICES = ("auto", "fixed", "linucb", "linucb_disjoint", "epsilon_greedy", "random", "edge_only",
                     "device_only")
#: One arm, served always: ``N<steps>k<split>``, ``e`` when the VAE decode runs on the edge (shared.bandit.arms).
ARM_LABEL = re.compile(r"N[1-9][0-9]*k[0-9]+e?")
SCHEDULER_HELP = (f"{', '.join(SCHEDULER_CHOICES)}, or one arm of the profile such as N20k10 (auto: linucb over the "
                  "family's profile.json or --profile, else fixed; all but fixed need a profile)")


#: The measured profile a family folder may ship (``python -m shared.bandit.profile`` builds one).
FAMILY_PROFILE = "profile.json"


def profile_missing(scheduler: str) -> ConfigError:
    """The error for a scheduler that needs a profile when neither ``--profile`` nor the family ships one."""
    return ConfigError(f"--scheduler {scheduler} needs --profile PROFILE.json or a family folder that ships "
                       f"{FAMILY_PROFILE} (made by: python -m shared.bandit.profile --eval EVAL.json ... "
                       "--out PROFILE.json)")


def needs_profile(scheduler: str) -> bool:
    """Every scheduler but ``auto`` (which falls back to ``fixed``) and ``fixed`` plans over a measured profile."""
    return scheduler not in ("auto", "fixed")


def check_scheduler(key: str, value: Any) -> str:
    """A ``--scheduler`` name (:data:`SCHEDULER_CHOICES` or an arm label), else a ConfigError listing them."""
    name = check_str(key, value, min_len=1, max_len=64, error=ConfigError)
    if name not in SCHEDULER_CHOICES and not ARM_LABEL.fullmatch(name):
        raise ConfigError(f"{key}: expected one of {', '.join(SCHEDULER_CHOICES)} or an arm such as N20k10, "
                          f"got {name!r}")
    return name


@dataclass(frozen=True)
class FamilySpec:
    """One family the edge serves: a name (for the operator, the metrics and the state file) and where it is."""

    name: str
    folder: str
    small: str | None = None
    variant: str | None = None
    profile: str | None = None  # the scheduler's measured profile (default: the folder's profile.json)

    @classmethod
    def parse(cls, text: str, *, small: str | None = None, variant: str | None = None) -> FamilySpec:
        """``--family DIR`` or ``--family NAME=DIR`` (the name defaults to the folder's)."""
        name, sep, folder = text.partition("=")
        if not sep:
            name, folder = Path(text).resolve().name, text
        return cls(name=check_family_name(name, f"--family {text}"), folder=folder, small=small, variant=variant)


def check_family_name(name: str, where: str) -> str:
    """A family's name: letters, digits, ``-``, ``_`` and ``.`` (it names metrics labels and state files)."""
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(f"{where}: a family name is 1-64 letters, digits, '-', '_' or '.', got {name!r}")
    return name


@dataclass
class EdgeConfig:
    """Everything ``rise-edge serve`` can be told, from ``--config edge.toml`` and flags (flags win)."""

    host: str = "127.0.0.1"
    port: int = 8765
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None
    max_batch_rows: int | None = None  # UNet rows per call; None (auto): 16 on a CPU, what fits a GPU (row_budget)
    max_queue: int = 64
    batching: bool = True
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (edge_server.placement)
    dtype: str = "auto"  # auto | fp32 | fp16 | bf16
    variant: str | None = None  # weights variant to load (fp16...); None: detected
    engine: str = "local"  # local | ray (replicas on Ray Serve: the cluster extra, edge_server.cluster)
    replicas: int = 2  # --engine ray: replicas (one per accelerator, or per CPU slice of --threads CPUs)
    ray_address: str | None = None  # --engine ray: join this Ray cluster (auto, ray://HEAD:10001); None: a local one
    request_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0
    ping_interval_s: float | None = 20.0  # websocket keepalive: ping every ... (None: never)
    ping_timeout_s: float | None = 20.0  # ... and drop a connection whose pong is this late
    # Connection caps, checked before the websocket upgrade (HTTP 503 / 429 beyond them).
    max_connections: int = 512  # websocket connections to this edge (as many again may be mid-handshake)
    max_connections_per_peer: int = 128  # ... from one IP address
    send_timeout_s: float = 30.0  # drop a connection whose peer takes none of the bytes waiting for it this long
    steps: int = 20
    split_fraction: float = 0.5
    sampler: str | None = None  # None: the family's default (lcm for LCM families, else dpmpp_2m)
    guidance: float = 7.5
    # auto: LinUCB over the family's shipped profile (FAMILY/profile.json) or --profile, else fixed.
    # auto | fixed | linucb | linucb_disjoint | epsilon_greedy | random | edge_only | device_only | N20k10...
    scheduler: str = "auto"
    profile: str | None = None  # measured profile (shared/bandit/profile.py); needed by every scheduler but fixed
    bandit_state: str | None = None  # where the scheduler's learned state persists (atomic JSON)
    alpha: float | None = None  # LinUCB exploration (default 0.1)
    # Speculative relay: mark a plan speculative (the device starts alone at once) when the predicted wait for
    # the handoff is at least this times k device steps (shared.planning.speculative_wanted); None: never.
    speculative_ratio: float | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    # Several families on one edge (edge_server.family_pool): ``[families.NAME]`` tables (folder, and optionally
    # small, variant, profile), which --family flags replace; when to load them; the budget their weights share.
    families: dict[str, dict[str, str]] = field(default_factory=dict)
    load_families: str = "start"  # start | first_use
    memory_budget_mb: float | None = None  # None: no budget, nothing is evicted

    @classmethod
    def from_toml(cls, path: str | Path) -> EdgeConfig:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        known = {f.name for f in fields(cls)}
        flat: dict[str, Any] = {}
        for section, values in data.items():  # sections are for the reader; keys are unique
            items = (values.items() if isinstance(values, dict) and section not in ("limits", "families")
                     else [(section, values)])
            for key, value in items:
                if key not in known:
                    raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
                try:
                    flat[key] = _TOML_CHECKS[key](key, value)
                except ConfigError as exc:
                    raise ConfigError(f"{path}: {exc}") from None
        config = cls(**flat)
        try:
            config.check_steps()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc} (the [limits] max_steps)") from None
        return config

    def family_specs(self, flags: list[str] | None = None, *, small: str | None = None) -> list[FamilySpec]:
        """The families to serve: ``--family`` flags (``DIR`` or ``NAME=DIR``) if given, else ``[families.NAME]``.

        ``--small`` applies to a lone ``--family``; several families name their small denoisers in the config."""
        if flags:
            if small is not None and len(flags) > 1:
                raise ConfigError("--small names one family's small denoiser: with several --family flags, name "
                                  "each one's in the config ([families.NAME] small = ...)")
            specs = [FamilySpec.parse(text, small=small, variant=self.variant) for text in flags]
        else:
            specs = [FamilySpec(check_family_name(name, f"families.{name}"), entry["folder"], entry.get("small"),
                                entry.get("variant", self.variant), entry.get("profile"))
                     for name, entry in self.families.items()]
        if not specs:
            raise ConfigError("no family to serve: give --family DIR (or [families.NAME] folder = ... in --config)")
        names = [spec.name for spec in specs]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ConfigError(f"family name {twice[0]!r} is given twice: name them --family NAME=DIR")
        if len(specs) > 1 and self.profile is not None:
            raise ConfigError("--profile is one family's: with several families, give each its profile in the "
                              "config ([families.NAME] profile = ...) or let each use the profile.json it ships")
        return specs

    def token(self) -> str | None:
        return None if self.token_file is None else read_token_file(self.token_file)[0]

    def ssl_context(self) -> ssl.SSLContext | None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_cert is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate/key: {exc}") from exc
        return context

    def max_steps(self) -> int:
        """The most steps a request (and ``steps``) may have: the ``[limits]`` max_steps."""
        return ProtocolLimits.from_dict({"allowed_sizes": (), **self.limits}).max_steps

    def check_steps(self, key: str = "steps") -> None:
        """``steps`` within [1, max_steps] of the limits (what requests meet), else a ConfigError naming ``key``."""
        check_int(key, self.steps, lo=1, hi=self.max_steps(), error=ConfigError)

    def warnings(self) -> list[str]:
        """What an operator should hear at start: an exposed host without a token or TLS, a token file
        others can read. One line each (reads the token file's mode; a file it cannot read says nothing here:
        :meth:`token` names that)."""
        found: list[str] = []
        where = f"{self.host}:{self.port}"
        tls = self.tls_cert is not None
        if not is_loopback(self.host):
            if self.token_file is None and not tls:
                found.append(f"listening on {where} (not only this machine) with no token and no TLS: anyone who "
                             "reaches the port can use the edge, and prompts and images travel in clear text "
                             "(--token-file, --tls-cert/--tls-key)")
            elif self.token_file is None:
                found.append(f"listening on {where} (not only this machine) with no token: anyone who reaches the "
                             "port can use the edge (--token-file)")
            elif not tls:
                found.append(f"listening on {where} (not only this machine) without TLS: the token, prompts and "
                             "images travel in clear text (--tls-cert/--tls-key)")
        if self.token_file is not None:
            try:
                mode = os.stat(self.token_file).st_mode
            except OSError:
                mode = 0
            readers = [who for who, bit in (("its group", stat.S_IRGRP), ("every user", stat.S_IROTH)) if mode & bit]
            if readers:
                found.append(f"token file {self.token_file} is readable by {' and '.join(readers)} "
                             f"(chmod 600 {self.token_file})")
        return found

    def described(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["token_file"] = "(set)" if self.token_file else None
        shown["max_batch_rows"] = self.max_batch_rows or "auto"
        return ", ".join(f"{k}={v}" for k, v in shown.items())


def _int(lo: int, hi: int | None = None) -> Callable[[str, Any], int]:
    return lambda key, value: check_int(key, value, lo=lo, hi=hi, error=ConfigError)


def _rows(key: str, value: Any) -> int | None:
    """``max_batch_rows``: ``auto`` (None) or a whole number of rows >= 1 (a flag's text is read as a number)."""
    if value == "auto":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, str):
        raise ConfigError(f"{key}: expected auto or an integer >= 1, got {value!r}")
    return check_int(key, value, lo=1, error=ConfigError)


def _float(lo: float, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str, Any], float]:
    return lambda key, value: check_float(key, value, lo=lo, hi=hi, lo_open=lo_open, error=ConfigError)


def _str(key: str, value: Any) -> str:
    return check_str(key, value, min_len=1, max_len=4096, error=ConfigError)


#: When the families of a multi-family edge load: all at start (as many as the budget holds), or each on first use.
LOAD_FAMILIES = ("start", "first_use")
_FAMILY_KEYS = ("folder", "small", "variant", "profile")


def _families(key: str, value: Any) -> dict[str, dict[str, str]]:
    """``[families.NAME]`` tables: ``folder`` (required), ``small``, ``variant``, ``profile`` (strings)."""
    table = check_mapping(key, value, error=ConfigError)
    families: dict[str, dict[str, str]] = {}
    for name, entry in table.items():
        where = f"{key}.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table with folder = \"DIR\", got {entry!r}")
        unknown = sorted(k for k in entry if k not in _FAMILY_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(_FAMILY_KEYS)}")
        if "folder" not in entry:
            raise ConfigError(f"{where}: needs folder = \"DIR\" (the family's pipeline folder)")
        families[str(name)] = {k: _str(f"{where}.{k}", v) for k, v in entry.items()}
    return families


def _limits(key: str, value: Any) -> dict[str, Any]:
    table = check_mapping(key, value, error=ConfigError)
    try:
        ProtocolLimits.from_dict(table)  # checked now, so a bad limit is named before anything loads
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return table


#: How ``from_toml`` checks each setting's value (TOML has no null: an optional setting is left out).
_TOML_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "host": _str,
    "port": _int(0, 65535),
    "token_file": _str,
    "tls_cert": _str,
    "tls_key": _str,
    "metrics_port": _int(0, 65535),
    "max_batch_rows": _rows,
    "max_queue": _int(1),
    "batching": lambda key, value: check_bool(key, value, error=ConfigError),
    "threads": _int(1),
    "device": _str,  # checked against the machine by edge_server.placement.resolve_placement
    "dtype": lambda key, value: check_choice(key, value, DTYPE_CHOICES, error=ConfigError),
    "variant": _str,
    "engine": lambda key, value: check_choice(key, value, ENGINE_CHOICES, error=ConfigError),
    "replicas": _int(1, 4096),
    "ray_address": _str,
    "request_timeout_s": _float(0.0, lo_open=True),
    "shutdown_grace_s": _float(0.0),
    "ping_interval_s": _float(0.0, lo_open=True),
    "ping_timeout_s": _float(0.0, lo_open=True),
    "max_connections": _int(1, 1_000_000),
    "max_connections_per_peer": _int(1, 1_000_000),
    "send_timeout_s": _float(0.0, 86400.0, lo_open=True),
    "steps": lambda key, value: check_int(key, value, error=ConfigError),  # its range: EdgeConfig.check_steps
    "split_fraction": _float(0.0, 1.0),
    "sampler": lambda key, value: check_choice(key, value, SAMPLER_NAMES, error=ConfigError),
    "guidance": _float(0.0, 50.0),
    "scheduler": check_scheduler,
    "profile": _str,
    "bandit_state": _str,
    "alpha": _float(0.0),
    "speculative_ratio": _float(0.0, lo_open=True),
    "limits": _limits,
    "families": _families,
    "load_families": lambda key, value: check_choice(key, value, LOAD_FAMILIES, error=ConfigError),
    "memory_budget_mb": _float(0.0, lo_open=True),
}


#: Flags for settings of EdgeConfig that are checked like their edge.toml key (the flag is named when wrong).
CHECKED_FLAGS: dict[str, str] = {
    "port": "--port",
    "metrics_port": "--metrics-port",
    "max_batch_rows": "--max-batch-rows",
    "max_queue": "--max-queue",
    "threads": "--threads",
    "replicas": "--replicas",
    "split_fraction": "--split-fraction",
    "guidance": "--guidance",
    "alpha": "--alpha",
    "speculative_ratio": "--speculative-ratio",
    "memory_budget_mb": "--memory-budget-mb",
    "shutdown_grace_s": "--shutdown-grace",
    "ping_interval_s": "--ping-interval",
    "ping_timeout_s": "--ping-timeout",
    "scheduler": "--scheduler",
    "max_connections": "--max-connections",
    "max_connections_per_peer": "--max-connections-per-peer",
    "send_timeout_s": "--send-timeout",
}
#: Flags for keys of the [limits] table (ProtocolLimits).
LIMIT_FLAGS: dict[str, str] = {
    "hello_timeout_s": "--hello-timeout",
    "frames_per_s": "--frames-per-s",
    "frame_burst": "--frame-burst",
    "max_refusals": "--max-refusals",
    "refusals_per_minute": "--refusals-per-minute",
    "max_outbox_bytes": "--max-outbox-bytes",
}


def default_text(name: str) -> str:
    """``(default: X)`` for an EdgeConfig setting or a ``[limits]`` key, from the dataclass itself (never drifts)."""
    if name in {f.name for f in fields(EdgeConfig)}:
        value = next(f for f in fields(EdgeConfig) if f.name == name).default
    else:
        value = getattr(ProtocolLimits(), name)
    return f"(default: {'auto' if value is None and name == 'max_batch_rows' else value})"


def add_flood_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the connection caps and flood limits (``rise-edge serve``)."""
    d = default_text
    parser.add_argument("--max-connections", type=int, dest="max_connections",
                        help=f"websocket connections to this edge before HTTP 503 {d('max_connections')}")
    parser.add_argument("--max-connections-per-peer", type=int, dest="max_connections_per_peer",
                        help=f"websocket connections from one IP address before HTTP 429 "
                             f"{d('max_connections_per_peer')}")
    parser.add_argument("--send-timeout", type=float, dest="send_timeout_s",
                        help="drop a connection whose peer takes none of the data waiting for it for this many "
                             f"seconds {d('send_timeout_s')}")
    parser.add_argument("--hello-timeout", type=float, dest="hello_timeout_s",
                        help="close a connection that has not said hello this many seconds after connecting "
                             f"{d('hello_timeout_s')}")
    parser.add_argument("--frames-per-s", type=float, dest="frames_per_s",
                        help=f"frames per second one connection may send, pings included {d('frames_per_s')} ...")
    parser.add_argument("--frame-burst", type=int, dest="frame_burst",
                        help=f"... with this many at once {d('frame_burst')}")
    parser.add_argument("--max-refusals", type=int, dest="max_refusals",
                        help="refused requests retried before their retry_after_s one connection may have at once "
                             f"{d('max_refusals')} ...")
    parser.add_argument("--refusals-per-minute", type=float, dest="refusals_per_minute",
                        help=f"... and per minute {d('refusals_per_minute')}")
    parser.add_argument("--max-outbox-bytes", type=int, dest="max_outbox_bytes",
                        help="bytes queued for a peer that is not reading before it is dropped "
                             f"{d('max_outbox_bytes')}")


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    config = EdgeConfig.from_toml(args.config) if args.config else EdgeConfig()
    for name in ("host", "token_file", "tls_cert", "tls_key", "steps", "profile", "bandit_state", "sampler",
                 "device", "dtype", "variant", "engine", "ray_address", "load_families"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    for name, flag in CHECKED_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, _TOML_CHECKS[name](flag, value))
    limits = dict(config.limits)
    for name, flag in LIMIT_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            try:
                ProtocolLimits.from_dict({**config.limits, name: value})
            except ConfigError as exc:
                raise ConfigError(f"{flag}: {exc}") from None
            limits[name] = value
    config.limits = limits
    config.check_steps("--steps" if args.steps is not None else "steps")
    if args.no_batching:
        config.batching = False
    return config
