"""Former home of the device's denoising loop, kept so ``from device_app.relay import finish_latents`` works.

The device half now lives in :mod:`device_app.finish` (:func:`~device_app.finish.finish_handoff`
for steps + decode, :func:`~device_app.finish.finish_latents` for the steps alone).
"""

from __future__ import annotations

from device_app.finish import StepCallback, finish_latents

__all__ = ["StepCallback", "finish_latents"]
