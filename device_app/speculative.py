"""The device's half of a speculative relay, and emulated slow devices: the parts without I/O.

A speculative plan (``RelayPlan.speculative``) has the device start its own device-only run as soon
as the plan arrives, while the edge request stays open. :class:`OwnRun` is that run's shared state
between the worker thread that steps it and the event loop that receives the handoff: how many of
its steps are done, and a stop flag the run obeys at its next step boundary (it raises
:class:`RunStopped` from its step callback, so :func:`device_app.finish.finish_handoff` needs no
cancellation of its own). :meth:`OwnRun.decide` applies the switch rule
(:func:`shared.planning.speculative_switch`) and stops the run under one lock, so the decision and
the step count it was made on agree.

:class:`EmulatedDevice` makes this machine behave like a slower device for tests and benchmarks: it
pads each ORT step to a tier's step time (and the VAE decode to its decode time) with an injected
sleeper and clock. The tiers' figures come from the lab's hardware profiles (``lab.hardware``:
``DeviceTier.step_s`` / ``decode_s``), which the caller resolves; the device package reads no lab
file.

No torch, no asyncio here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from shared.planning import speculative_switch

__all__ = ["EmulatedDevice", "OwnRun", "ResultPath", "RunStopped", "StepCallback"]

#: Which path made a result: ``relay`` (the device finished the edge's handoff), ``device`` (every
#: step on this device: a speculative run that won, or offline), ``edge`` (the edge decoded it).
ResultPath = Literal["relay", "device", "edge"]
StepCallback = Callable[[int, int], None]
Sleeper = Callable[[float], None]
Clock = Callable[[], float]


class RunStopped(Exception):
    """Raised inside the device's own run when the handoff won: the run ends at that step boundary."""


@dataclass
class OwnRun:
    """The device-only run of a speculative relay: ``total`` steps, ``done`` so far, stoppable (thread-safe).

    ``on_step`` is the run's step callback (worker thread): it records the step, calls ``then``
    (progress, emulation) and raises :class:`RunStopped` once :meth:`decide` chose the handoff.
    """

    total: int
    then: StepCallback | None = None
    done: int = 0
    switched: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_step(self, step: int, total: int) -> None:
        with self._lock:
            self.done = step
            stop = self.switched
        if stop:
            raise RunStopped(f"the edge's handoff won at own step {step} of {total}")
        if self.then is not None:
            self.then(step, total)

    def decide(self, relay_total: int, handoff_split: int, *, slack_steps: float = 0.0,
               finished: bool = False) -> bool:
        """The handoff arrived: switch to it (True: the run stops at its next step) or finish alone.

        ``finished``: the run has already done all its steps (it may be decoding): never switch.
        """
        with self._lock:
            if finished:
                return False
            if self.switched:
                return True
            done = min(self.done, self.total)
            self.switched = speculative_switch(self.total, done, relay_total, handoff_split, slack_steps=slack_steps)
            return self.switched

    @property
    def steps_done(self) -> int:
        with self._lock:
            return self.done


@dataclass
class EmulatedDevice:
    """Pads this machine's device work to a slower device's: each step to ``step_s``, the decode to ``decode_s``.

    Call :meth:`start` when a run begins, :meth:`step` after each ORT step (its step callback) and
    :meth:`decode` with the seconds the real decode took. ``sleep`` and ``clock`` are injected
    (tests pass fakes; ``time.sleep`` blocks only the worker thread the device runs in).
    """

    step_s: float
    decode_s: float = 0.0
    sleep: Sleeper = time.sleep
    clock: Clock = time.perf_counter
    _mark: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("step_s", "decode_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < float("inf")):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")

    def start(self) -> None:
        self._mark = self.clock()

    def step(self, step: int = 0, total: int = 0) -> None:
        """Sleep what this step lacks of ``step_s`` (since :meth:`start` or the previous step)."""
        now = self.clock()
        elapsed = 0.0 if self._mark is None else now - self._mark
        if self.step_s > elapsed:
            self.sleep(self.step_s - elapsed)
        self._mark = self.clock()

    def decode(self, took_s: float) -> float:
        """Sleep what a decode of ``took_s`` lacks of ``decode_s``; returns the padded decode time."""
        if self.decode_s > took_s:
            self.sleep(self.decode_s - took_s)
            return self.decode_s
        return took_s

    def chain(self, then: StepCallback | None) -> StepCallback:
        """A step callback that paces, then calls ``then`` (the progress report) if given."""

        def on_step(step: int, total: int) -> None:
            self.step(step, total)
            if then is not None:
                then(step, total)

        return on_step
