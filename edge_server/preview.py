"""The edge's live previews: the family's latent-to-RGB projection, fitted once from its own models.

See :mod:`shared.preview` for what a preview is and why it is a linear projection. A preview
draws the *predicted clean latent* of a step, so the fit uses exactly those: a few short
generations with the family's large UNet at a small latent size (:data:`FIT_STEPS` steps at
:data:`shared.preview.FIT_SIDE` latent pixels a side, guided, from prompts the family draws:
its grammar's examples, or :data:`FIT_PROMPTS` for free text), the x0 of each step in the
second half decoded by the VAE. Random normal latents, empty prompts or the blurry x0 of the
first steps, the obvious shortcuts, pull the fit towards colours the family's pictures do not
have (looked at on the demo family: items came out faint on a grey background). The fit runs
once per loaded family, the first time a request asks for a preview: under a second for the
demo family, a few seconds for SD1.5 on a CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from edge_server.batching import batched_step
from edge_server.family import Family
from edge_server.png import encode_png
from edge_server.relay import decode_latents, prepare
from shared.preview import FIT_SIDE, LatentProjection, LazyProjection, fit_projection
from shared.relay_plan import RelayPlan

FIT_STEPS = 8
#: Prompts for free-text families' fit: colourful, varied scenes.
FIT_PROMPTS = (
    "a photo of a red apple on a wooden table",
    "green hills under a blue sky with white clouds",
    "a portrait of a woman in a yellow dress",
    "a city street at night with neon lights",
)


def fit_prompts(family: Family) -> list[str]:
    """What the fit generates: the family's own grammar's examples, else :data:`FIT_PROMPTS`."""
    if family.prompt_grammar == "demo":
        from shared.demo_grammar.understanding import example_prompts

        return example_prompts(len(FIT_PROMPTS))
    return list(FIT_PROMPTS)


@torch.no_grad()
def fit_family_projection(family: Family) -> LatentProjection:
    """The family's projection, fitted on the VAE decodes of its own predicted clean latents."""
    side = FIT_SIDE * family.vae_scale_factor
    plan = RelayPlan(FIT_STEPS, FIT_STEPS, family.default_sampler, 7.5)
    jobs = [prepare(family, prompt, plan, seed, height=side, width=side)
            for seed, prompt in enumerate(fit_prompts(family))]
    x0s: list[torch.Tensor] = []
    while not jobs[0].done:
        batched_step(family.large_unet, jobs)
        if jobs[0].next_step > FIT_STEPS // 2:
            x0s += [job.x0 for job in jobs if job.x0 is not None]
    latents = torch.cat(x0s)
    images = decode_latents(family, latents)
    return fit_projection(latents.float().cpu().numpy(), images, family.vae_scale_factor)


class PreviewRenderer:
    """Renders previews for one family; fits its projection on first use (thread-safe)."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self._projection = LazyProjection(lambda: fit_family_projection(family))

    @property
    def projection(self) -> LatentProjection:
        return self._projection.get()

    def render(self, x0: torch.Tensor) -> NDArray[np.uint8]:
        """(h, w, 3) uint8 from one job's predicted clean latent (1, C, h, w), on any device or dtype."""
        return self.projection.render(x0.detach().to(device="cpu", dtype=torch.float32).numpy())

    def png(self, x0: torch.Tensor) -> bytes:
        return encode_png(self.render(x0))
