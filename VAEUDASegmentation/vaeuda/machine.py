"""The computer a result was computed on: named in reports, recorded in model files.

Training is bit-reproducible for a seed on one computer, but not from one computer to another:
MKL and oneDNN pick their kernels by the CPU's instruction set, the thread count changes the
order of reductions, and the libraries' environment variables below switch both. Each gives
the same training other rounding, and hundreds of iterations turn that into another model (on
the demo's cohort the unadapted CT score moves by up to 31 points on one machine:
Docs/results.md, "The source model depends on the CPU"). So a model file records them, and a
report names them.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# The variables that change which kernels run or how many threads share them.
KERNEL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                    "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numerics() -> dict:
    """What decides the rounding of a CPU run: CPU model, torch threads, torch's vector kernels
    and any of :data:`KERNEL_VARIABLES` set in the environment."""
    import torch   # here, not at the top: the CLI imports this module before it needs torch
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "environment": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ}}


def description() -> str:
    """One line for a report, e.g. ``Intel(R) Xeon(R) Processor, 2 logical cores, no GPU, torch
    2.13.0+cpu, 2 threads, AVX512 kernels``, plus any kernel variable that is set."""
    import torch
    n = numerics()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    text = (f"{n['cpu']}, {os.cpu_count()} logical cores, {gpu}, torch {torch.__version__}, "
            f"{n['threads']} thread{'' if n['threads'] == 1 else 's'}, {n['cpu_capability']} kernels")
    return text + "".join(f", {k}={v}" for k, v in n["environment"].items())
