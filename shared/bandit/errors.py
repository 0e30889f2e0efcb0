"""Errors of the scheduler's pure core; all are :class:`~shared.errors.RiseError` s users can catch."""

from __future__ import annotations

from shared.errors import RiseError


class BanditError(RiseError, ValueError):
    """A bandit component was given something it cannot use (wrong shape, unknown arm...)."""


class StateError(BanditError):
    """A persisted scheduler state is unreadable, of another version, or for other arms/features."""


class ProfileError(BanditError):
    """A quality/timing profile (or a rise-eval file it is built from) is malformed or incomplete."""
