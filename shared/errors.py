"""The exception hierarchy users of RISE can catch.

Every error a user can cause (bad input, a bad bundle, a bad payload) derives from
:class:`RiseError`, so a caller can catch one type; the subclasses say which part failed.
Those that are also ``ValueError`` keep the diffusers convention for bad arguments.
"""

from __future__ import annotations

from typing import Literal

#: How a field failed a check of :mod:`shared.validation`: its type, its form, or its range.
FieldFailure = Literal["type", "format", "range"]


class RiseError(Exception):
    """Base class of every error RISE raises on purpose."""

    @classmethod
    def for_field(cls, message: str, *, field: str, kind: FieldFailure) -> RiseError:
        """The error :mod:`shared.validation` raises when ``field`` fails a check; subclasses may use ``kind``."""
        return cls(message)


class ConfigError(RiseError, ValueError):
    """A configuration (scheduler config, CLI arguments, relay plan) is invalid or unsupported."""


class FamilyError(RiseError, ValueError):
    """A model family folder is missing, incomplete, or its members do not share a latent space."""


class SamplerError(RiseError, ValueError):
    """A sampler was driven wrongly: a timestep out of turn, a step past the end, bad arrays."""


class HandoffError(RiseError, ValueError):
    """A handoff payload is malformed, oversized, inconsistent, or for another family."""


class BundleError(RiseError):
    """A device bundle is missing files, has a bad manifest, or fails its integrity check."""


class IntegrityError(BundleError):
    """A bundle file's sha256 differs from the manifest: the file was changed after export."""


class ExportError(RiseError):
    """An export failed, including an exported graph that disagrees with PyTorch past tolerance."""
