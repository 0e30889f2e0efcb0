"""``rise-eval``'s cache of reference ceilings: the VAE round trip of the real scenes, done once.

The ceilings (:func:`lab.demo_family.evaluate.ceilings`) depend only on the family's VAE (its
weights and where it computes: dtype, device type), the scorer's weights, the Fashion-MNIST test
items, the number of real scenes and the prompts' scenes (plus the fixed seeds and the code,
:data:`CACHE_VERSION`). :class:`CeilingKey` fingerprints exactly those; a file
``<cache dir>/ceilings/<digest>.json`` holds the figures. Any change of a part is another digest,
so a stale file is never read; a file that cannot be read or does not match its key is recomputed
and replaced. The folder is ``$RISE_CACHE_DIR``, else ``$XDG_CACHE_HOME/rise``, else ``~/.cache/rise``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import ItemBank, Scene

#: Bump when what :func:`~lab.demo_family.evaluate.ceilings` computes changes (seeds, rendering,
#: metrics): every cached file then misses.
CACHE_VERSION = 1
CACHE_ENV = "RISE_CACHE_DIR"
CEILING_KEYS = ("real", "vae")


def default_cache_dir() -> Path:
    """``$RISE_CACHE_DIR``, else ``$XDG_CACHE_HOME/rise``, else ``~/.cache/rise``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rise"


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "little"))  # length-prefixed: no two sequences hash alike
        h.update(chunk)
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """Fingerprint of a module's weights and buffers (names, dtypes, shapes, values)."""

    def chunks() -> Iterable[bytes]:
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            yield f"{name}:{t.dtype}:{tuple(t.shape)}".encode()
            yield t.reshape(-1).view(torch.uint8).numpy().tobytes()

    return _digest(chunks())


def arrays_digest(*arrays: np.ndarray) -> str:
    """Fingerprint of numpy arrays (dtypes, shapes, values)."""
    return _digest(b for a in arrays for b in (f"{a.dtype}:{a.shape}".encode(), np.ascontiguousarray(a).tobytes()))


def bank_digest(bank: ItemBank) -> str:
    """Fingerprint of an item bank: its split, items, categories and source ids."""
    return _digest([bank.split.encode(), arrays_digest(bank.items, bank.categories, bank.source_ids).encode()])


def scenes_digest(scenes: Sequence[Scene]) -> str:
    """Fingerprint of a scene list, in order (what every cell holds)."""
    targets = [s.targets() for s in scenes]
    return arrays_digest(np.stack([c for c, _ in targets]), np.stack([c for _, c in targets]))


@dataclass(frozen=True)
class CeilingKey:
    """Everything the ceilings depend on."""

    vae: str  # module_digest of the family's VAE
    vae_placement: str  # "<dtype> on <device type>": fp16 on CUDA rounds differently from fp32 on a CPU
    scorer: str  # module_digest of the scorer's network
    bank: str  # bank_digest of the Fashion-MNIST test items
    scenes: str  # scenes_digest of the prompts' scenes
    n: int  # real held-out scenes
    seeds: tuple[int, ...]  # the harness's fixed seeds
    version: int = CACHE_VERSION

    def digest(self) -> str:
        return _digest([json.dumps(asdict(self), sort_keys=True).encode()])


def ceiling_key(vae: torch.nn.Module, scorer_net: torch.nn.Module, bank: ItemBank, n: int,
                scenes: Sequence[Scene], seeds: Sequence[int]) -> CeilingKey:
    """The :class:`CeilingKey` of one harness run."""
    param = next(iter(vae.parameters()), None)
    placement = "none" if param is None else f"{param.dtype} on {param.device.type}"
    return CeilingKey(module_digest(vae), placement, module_digest(scorer_net), bank_digest(bank),
                      scenes_digest(scenes), int(n), tuple(int(s) for s in seeds))


def _valid(ceilings: Any) -> bool:
    return isinstance(ceilings, dict) and all(
        isinstance(ceilings.get(k), dict) and {"adherence", "adherence_by_items", "frechet", "n"} <= set(ceilings[k])
        for k in CEILING_KEYS)


class CeilingCache:
    """JSON files of ceilings, one per :class:`CeilingKey` digest, under ``folder/ceilings``.

    ``refresh=True`` never reads (always recomputes) but still writes the fresh figures. Reading
    and writing never raise: a cache that cannot be used costs the computation, nothing else.
    """

    def __init__(self, folder: str | Path | None = None, *, refresh: bool = False) -> None:
        self.folder = Path(folder if folder is not None else default_cache_dir()) / "ceilings"
        self.refresh = refresh

    def path(self, key: CeilingKey) -> Path:
        return self.folder / f"{key.digest()}.json"

    def load(self, key: CeilingKey) -> dict[str, Any] | None:
        """The cached ceilings of ``key``, or ``None`` (refreshing, absent, unreadable or not this key's)."""
        if self.refresh:
            return None
        try:
            doc = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("key") != _key_doc(key) or not _valid(doc.get("ceilings")):
            return None
        ceilings: dict[str, Any] = doc["ceilings"]
        return ceilings

    def store(self, key: CeilingKey, ceilings: dict[str, Any]) -> Path | None:
        """Write ``ceilings`` atomically (a concurrent run reads the old file or the new one); the path,
        or ``None`` if the folder is not writable."""
        path = self.path(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.folder)
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump({"key": _key_doc(key), "ceilings": ceilings}, fh, indent=1)
                    fh.write("\n")
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return None
        return path


def _key_doc(key: CeilingKey) -> dict[str, Any]:
    doc = asdict(key)
    doc["seeds"] = list(key.seeds)  # as JSON reads it back
    return doc


def cached_ceilings(key: CeilingKey, compute: Callable[[], dict[str, Any]],
                    cache: CeilingCache | None) -> tuple[dict[str, Any], str]:
    """The ceilings of ``key`` from ``cache`` or else from ``compute()`` (then stored); and where they
    came from: ``"cache <path>"``, ``"computed, cached in <path>"``, ``"computed"`` (no cache, or
    not writable)."""
    if cache is not None and (hit := cache.load(key)) is not None:
        return hit, f"cache {cache.path(key)}"
    ceilings = compute()
    stored = cache.store(key, ceilings) if cache is not None else None
    return ceilings, "computed" if stored is None else f"computed, cached in {stored}"
