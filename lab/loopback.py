"""The whole service on one machine: an edge daemon and a device client over loopback.

What README's first command runs: the real ``EdgeServer`` (batching engine, protocol, token
auth) listens on 127.0.0.1 at a free port, a real ``EdgeClient`` connects with the device
bundle, and each prompt goes edge -> websocket handoff -> ORT -> image, exactly as across
two machines.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from device_app.client import EdgeClient
from device_app.results import GenerationResult
from device_app.runtime import DeviceBundle
from edge_server.daemon import EdgeConfig, EdgeServer
from edge_server.family import Family
from shared.relay_plan import RelayPlan

ResultCallback = Callable[[int, GenerationResult], None]


async def _generate(family: Family, bundle: DeviceBundle, prompts: Sequence[str], plan: RelayPlan,
                    seeds: Sequence[int], on_result: ResultCallback | None) -> list[GenerationResult]:
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(token)
        config = EdgeConfig(host="127.0.0.1", port=0, token_file=str(token_file))
        server = EdgeServer.with_batching_engine(family, config)
    port = await server.start()
    results: list[GenerationResult] = []
    try:
        async with EdgeClient.connect(f"ws://127.0.0.1:{port}", bundle, token=token, client_name="rise-demo") as client:
            for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
                # The edge's per-connection rate limit (burst 5) holds for the demo too: wait as it advises.
                result = await client.generate_with_retry(prompt, seed=seed, pinned=plan)
                results.append(result)
                if on_result is not None:
                    on_result(i, result)
    finally:
        await server.stop()
    return results


def generate_over_loopback(family: Family, bundle: DeviceBundle, prompts: Sequence[str], plan: RelayPlan,
                           seeds: Sequence[int] | None = None,
                           on_result: ResultCallback | None = None) -> list[GenerationResult]:
    """Serve ``family`` on 127.0.0.1 and generate every prompt through a device client."""
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    return asyncio.run(_generate(family, bundle, prompts, plan, seeds, on_result))
