"""The computer a result was computed on: named in reports, recorded in model files.

Training is bit-reproducible for a seed on one computer, but not from one computer to another:
MKL and oneDNN pick their kernels by the CPU's instruction set, the thread count changes the
order of reductions, and the libraries' environment variables below switch both. Each gives
the same training other rounding, and hundreds of iterations turn that into another model (on
the demo's cohort the unadapted CT score moves by up to 31 points on one machine:
Docs/results.md, "The source model depends on the CPU"). So a model file records them, and a
report names them.

:func:`use_portable_numerics` (the command line's ``--portable``) takes the paths that do not
depend on the instruction set: MKL's conditional-numerical-reproducibility branch for SSE2
(``MKL_CBWR=COMPATIBLE,STRICT``, which Intel documents as reproducible on Intel and non-Intel
CPUs), torch's baseline kernels instead of its AVX2 / AVX-512 ones, no oneDNN (it has no such
mode; convolutions then run as im2col and MKL matrix products) and a fixed thread count. It costs
about 3.5x the time of a training run (Docs/results.md, "Portable numerics").
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from .errors import VaeudaError

CPUINFO = Path("/proc/cpuinfo")

# The variables that change which kernels run or how many threads share them.
KERNEL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                    "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")

# What --portable sets before torch starts; both libraries read them once, at their first use.
PORTABLE_ENVIRONMENT = {"MKL_CBWR": "COMPATIBLE,STRICT", "ATEN_CPU_CAPABILITY": "default"}
# MKL's reproducibility asks for a fixed thread count, and torch's own reductions split by it.
PORTABLE_THREADS = 2


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def use_portable_numerics() -> None:
    """Compute on the CPU the same way whichever instruction set it has (see the module's
    docstring); for the rest of the process.

    Call it before torch is imported (the command line does): MKL reads ``MKL_CBWR`` once, and
    nothing tells afterwards whether it did. With torch already imported, the variables of
    :data:`PORTABLE_ENVIRONMENT` must have been set before the process started.
    """
    for name, value in PORTABLE_ENVIRONMENT.items():
        if os.environ.get(name, value).upper() != value.upper():
            raise VaeudaError(f"Portable numerics need {name}={value}, but the environment sets "
                              f"{name}={os.environ[name]}.")
    if "torch" in sys.modules and any(name not in os.environ for name in PORTABLE_ENVIRONMENT):
        raise VaeudaError("Portable numerics must be chosen before torch is imported: start Python with "
                          + " ".join(f"{k}={v}" for k, v in PORTABLE_ENVIRONMENT.items())
                          + ", or use the vaeuda command line with --portable.")
    os.environ.update(PORTABLE_ENVIRONMENT)
    import torch
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":      # torch chose before the variable was set
        raise VaeudaError("Portable numerics need torch's baseline CPU kernels, but torch had already "
                          f"chosen its {torch.backends.cpu.get_cpu_capability()} kernels.")
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(PORTABLE_THREADS)


def portable() -> bool:
    """Whether this process computes as :func:`use_portable_numerics` sets it up."""
    import torch
    return (all(os.environ.get(k, "").upper() == v.upper() for k, v in PORTABLE_ENVIRONMENT.items())
            and not torch.backends.mkldnn.enabled and torch.get_num_threads() == PORTABLE_THREADS
            and torch.backends.cpu.get_cpu_capability() == "DEFAULT")


def kernel_environment() -> dict:
    """The :data:`KERNEL_VARIABLES` set in this process's environment, name -> value."""
    return {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ}


def numerics() -> dict:
    """What decides the rounding of a CPU run: CPU model, torch threads, torch's vector kernels,
    any of :data:`KERNEL_VARIABLES` set in the environment, and whether the run is portable."""
    import torch   # here, not at the top: the CLI imports this module before it needs torch
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "environment": kernel_environment(),
            "portable": portable()}


def description() -> str:
    """One line for a report, e.g. ``Intel(R) Xeon(R) Processor, 2 logical cores, no GPU, torch
    2.13.0+cpu, 2 threads, AVX512 kernels``, plus any kernel variable that is set and, for a
    portable run, ``portable numerics``."""
    import torch
    n = numerics()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    text = (f"{n['cpu']}, {os.cpu_count()} logical cores, {gpu}, torch {torch.__version__}, "
            f"{n['threads']} thread{'' if n['threads'] == 1 else 's'}, {n['cpu_capability']} kernels")
    text += "".join(f", {k}={v}" for k, v in n["environment"].items())
    return text + (", portable numerics" if n["portable"] else "")
