"""The bundle's tokenizer: one ``tokenizer.json`` the device's ``tokenizers`` library loads.

Stable Diffusion families ship CLIP's slow tokenizer files (``vocab.json`` + ``merges.txt``);
transformers converts them to a fast tokenizer offline, whose backend we save as
``tokenizer.json`` with SD's padding and truncation baked in, so that on the device
``Tokenizer.from_file(...).encode(prompt).ids`` is exactly what the edge feeds its text
encoder. The original files are copied beside it. The conversion is checked on sample
prompts against the family's own tokenizer.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ExportError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_JSON = "tokenizer.json"
# Prompts the conversion is checked on: empty, plain, case/punctuation/whitespace, over-long.
CHECK_PROMPTS = (
    "",
    "a photo of an astronaut riding a horse on mars",
    "A  Watercolor, of the Old-Town;\tat dusk!",
    "a very long prompt " * 20,
)


@dataclass(frozen=True)
class TokenizerSummary:
    """What the manifest records about the written tokenizer."""

    files: list[str]  # names inside the tokenizer folder
    max_length: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int


def _ids(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int) -> list[int]:
    return list(tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids)


def write_bundle_tokenizer(
    tokenizer: PreTrainedTokenizerBase, source_folder: Path | None, dst: Path
) -> TokenizerSummary:
    """Write ``dst/tokenizer.json`` (+ the original files from ``source_folder``) and check it.

    ``tokenizer`` is the family's loaded (slow or fast) CLIP tokenizer: the reference.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    dst.mkdir(parents=True, exist_ok=True)
    if source_folder is not None and source_folder.is_dir():
        for path in sorted(source_folder.iterdir()):
            if path.is_file():
                shutil.copy2(path, dst / path.name)
    else:
        tokenizer.save_pretrained(dst)
    max_length = int(tokenizer.model_max_length)
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        fast = tokenizer
    else:
        from transformers import AutoTokenizer

        try:  # converts vocab.json + merges.txt with transformers' slow->fast converter, offline
            fast = AutoTokenizer.from_pretrained(
                dst, use_fast=True, from_slow=True, local_files_only=True
            )
        except Exception as exc:
            raise ExportError(f"cannot convert the tokenizer to a fast (tokenizers) one: {exc}") from exc
    backend = Tokenizer.from_str(fast.backend_tokenizer.to_str())  # a copy: don't change the family's
    if tokenizer.pad_token_id is None:
        raise ExportError("the family's tokenizer has no pad token: cannot pad prompts to a fixed length")
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(length=max_length, pad_id=int(tokenizer.pad_token_id), pad_token=str(tokenizer.pad_token))
    backend.save(str(dst / TOKENIZER_JSON))
    reloaded = Tokenizer.from_file(str(dst / TOKENIZER_JSON))
    for prompt in CHECK_PROMPTS:
        expected = _ids(tokenizer, prompt, max_length)
        got = reloaded.encode(prompt).ids
        if got != expected:
            raise ExportError(
                f"the converted tokenizer disagrees with the family's on {prompt[:40]!r}: "
                f"{got[:8]}... vs {expected[:8]}..."
            )
    return TokenizerSummary(
        files=sorted(p.name for p in dst.iterdir() if p.is_file()),
        max_length=max_length,
        pad_token_id=int(tokenizer.pad_token_id),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=int(tokenizer.eos_token_id),
    )
