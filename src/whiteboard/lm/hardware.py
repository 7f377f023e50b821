"""What this machine runs natively, for choices that depend on it: ``decoder_precision =
"auto"`` takes bfloat16 only where the hardware computes it (a CPU with AMX or
AVX512-BF16, a GPU that supports it), float32 elsewhere, where bfloat16 is emulated and
slower (2.3x slower for the ptb-small-awd preset on an AVX-512 CPU without either)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from whiteboard.lm.config import resolve_device

#: /proc/cpuinfo flags of instructions that compute in bfloat16
_BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bfloat16(device: str) -> tuple[bool, str]:
    """(whether ``device`` computes bfloat16 natively, the reason in a few words)."""
    kind = torch.device(device).type
    if kind == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return supported, f"{torch.cuda.get_device_name()} {'supports' if supported else 'lacks'} bfloat16"
    found = sorted(set(_BFLOAT16_FLAGS) & cpu_flags())
    if found:
        return True, f"this CPU has {', '.join(found)}"
    return False, f"this CPU ({platform.machine()}) has neither AMX nor AVX512-BF16: bfloat16 would be emulated"


def settle_decoder_precision(config, decide, log) -> None:
    """``model.decoder_precision = "auto"`` as what this machine runs natively, said once and
    written into the config, so the run directory records it and a resume keeps it.
    ``decide``: the distributed world's (every rank takes rank 0's answer)."""
    if config.model.decoder_precision != "auto":
        return
    native, why = native_bfloat16(resolve_device(config.train.device))
    config.model.decoder_precision = "bfloat16" if decide(native) else "float32"
    log(f"model.decoder_precision=auto: {config.model.decoder_precision} ({why})")
