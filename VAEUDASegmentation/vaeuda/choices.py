"""The devices, presets and encoders the command line and the Slicer module offer.

Torch-free, so that the Slicer module can check a batch call's values before it starts the engine.
"""
from .errors import VaeudaError

DEVICES = ("auto", "cpu", "cuda")
"""``auto``: CUDA when present (bf16 autocast there), else the CPU."""

PRESET_NAMES = ("cpu", "paper", "tiny")
"""The keys of :data:`vaeuda.nets.PRESETS`; ``tiny`` is for tests (seconds per run)."""

PANEL_PRESET_NAMES = ("cpu", "paper")
"""The presets the Slicer panel offers (with ``auto``: the engine's choice)."""

DOMAINS = ("source", "target")
"""The encoders an image can be read with: E_S (source) or E_T (target)."""


def check_choice(flag: str, value, choices) -> None:
    """Refuse, in one sentence naming ``flag``, a ``value`` that is not one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise VaeudaError(f"{flag} must be one of {', '.join(choices)}, not {value!r}.")


def check_portable(portable: bool, device: str, cpu_bf16: bool = False) -> None:
    """Refuse portable numerics (``--portable``) with CUDA or with bf16 on the CPU."""
    if portable and device == "cuda":
        raise VaeudaError("--portable is for the CPU; it cannot be combined with --device cuda.")
    if portable and cpu_bf16:     # native and emulated bf16 round differently
        raise VaeudaError("--portable computes in float32; it cannot be combined with --cpu-bf16.")
