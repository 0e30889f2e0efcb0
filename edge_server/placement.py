"""Where the edge computes: a torch device and the dtype its models run in, from ``--device`` / ``--dtype``.

``auto`` means the first CUDA device in fp16 when there is one, else the CPU in fp32. What stays
float32 whatever the dtype: the latents and the sampler's arithmetic (diffusers' fp16 pipelines
step in fp16; we only run the networks in the low precision, which keeps the handoff exact to the
edge's own trajectory), the initial noise (drawn on the CPU generator in float32, so a seed gives
the same picture on any device) and everything on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)


@dataclass(frozen=True)
class Placement:
    """A resolved device and compute dtype."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    def describe(self) -> str:
        if self.device.type == "cuda":
            index = self.device.index or 0
            return f"{self.device} ({torch.cuda.get_device_name(index)}), {self.dtype_name}"
        return f"{self.device}, {self.dtype_name}"


CPU_FP32 = Placement(torch.device("cpu"), torch.float32)


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """The placement ``--device`` / ``--dtype`` name; ConfigError (one line) for one this machine lacks."""
    if not isinstance(device, str) or not isinstance(dtype, str):
        raise ConfigError(f"--device and --dtype are names, got {device!r} and {dtype!r}")
    if dtype not in DTYPE_CHOICES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    cuda = torch.cuda.is_available()
    if device == "auto":
        where = torch.device("cuda:0") if cuda else torch.device("cpu")
    elif device == "cpu":
        where = torch.device("cpu")
    elif device == "cuda" or device.startswith("cuda:"):
        index_text = device.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ConfigError(f"--device {device!r}: expected cuda or cuda:N with N a device number")
        if not cuda:
            raise ConfigError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__} "
                              f"sees none; CUDA build: {torch.version.cuda is not None})")
        count = torch.cuda.device_count()
        if int(index_text) >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        where = torch.device(f"cuda:{int(index_text)}")
    else:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dtype == "auto":
        chosen = torch.float16 if where.type == "cuda" else torch.float32
    else:
        chosen = DTYPES[dtype]
    return Placement(where, chosen)  # fp16 on a CPU runs (slowly): it is how the CPU tests cover that path
