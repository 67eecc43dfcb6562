"""The computer a result was computed on: named in reports, recorded in model files.

Training is bit-reproducible for a seed on one computer, but not from one computer to another:
MKL and oneDNN pick their kernels by the CPU's instruction set, the thread count changes the
order of reductions, and the libraries' environment variables below switch both. Each gives
the same training other rounding, and hundreds of iterations turn that into another model (on
the demo's cohort the unadapted CT score moves by up to 31 points on one machine:
Docs/results.md, "The source model depends on the CPU"). So a model file records them, with a
:func:`fingerprint` of how the kernels round, and a report names them.

:func:`use_portable_numerics` (the command line's ``--portable``) takes the paths that do not
depend on the instruction set: MKL's conditional-numerical-reproducibility branch for SSE2
(``MKL_CBWR=COMPATIBLE,STRICT``, which Intel documents as reproducible on Intel and non-Intel
CPUs), torch's baseline kernels instead of its AVX2 / AVX-512 ones, no oneDNN (it has no such
mode; convolutions then run as im2col and MKL matrix products), no NNPACK (inference batches of
16 and more would use it; it blocks its sums by the CPU's cache sizes and needs AVX2) and a fixed
thread count. It costs 3.5x the time of a training run on an Intel Xeon, 5-6x on an AMD EPYC. Measured: it makes a run the same
under every kernel path of one CPU, but an AMD EPYC and an Intel Xeon still trained different
models with it (Docs/results.md, "Portable numerics").
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Dict

from .errors import VaeudaError

CPUINFO = Path("/proc/cpuinfo")

# The variables that change which kernels run or how many threads share them.
KERNEL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")   # DNNL_: oneDNN's older name

# What --portable sets before torch starts; both libraries read them once, at their first use.
PORTABLE_ENVIRONMENT = {"MKL_CBWR": "COMPATIBLE,STRICT", "ATEN_CPU_CAPABILITY": "default"}
# MKL's reproducibility asks for a fixed thread count, and torch's own reductions split by it.
PORTABLE_THREADS = 2
# How torch names its baseline kernels: "DEFAULT" since torch 2.9, "NO AVX" on x86 before
# (pytorch/pytorch#157809); the PyTorch extension of an older Slicer installs such a torch.
BASELINE_CAPABILITIES = ("DEFAULT", "NO AVX")


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in CPUINFO.read_text(encoding="utf-8").splitlines():
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
        if os.environ.get(name, value) != value:     # exactly: MKL ignores a lower-case MKL_CBWR
            raise VaeudaError(f"Portable numerics need {name}={value}, but the environment sets "
                              f"{name}={os.environ[name]}.")
    if "torch" in sys.modules and any(name not in os.environ for name in PORTABLE_ENVIRONMENT):
        raise VaeudaError("Portable numerics must be chosen before torch is imported: start Python with "
                          + " ".join(f"{k}={v}" for k, v in PORTABLE_ENVIRONMENT.items())
                          + ", or use the vaeuda command line with --portable.")
    os.environ.update(PORTABLE_ENVIRONMENT)
    import torch
    if torch.backends.cpu.get_cpu_capability() not in BASELINE_CAPABILITIES:   # torch chose before the variable
        raise VaeudaError("Portable numerics need torch's baseline CPU kernels, but torch had already "
                          f"chosen its {torch.backends.cpu.get_cpu_capability()} kernels.")
    try:
        import torch.backends.nnpack     # NNPACK picks its kernels by instruction set; torch 2.3 added its switch
    except ImportError:
        raise VaeudaError(f"Portable numerics need torch 2.3 or later, which can switch NNPACK's kernels off; "
                          f"this is torch {torch.__version__}.") from None
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)
    torch.set_num_threads(PORTABLE_THREADS)


def portable() -> bool:
    """Whether this process computes as :func:`use_portable_numerics` sets it up."""
    import torch
    return (all(os.environ.get(k) == v for k, v in PORTABLE_ENVIRONMENT.items())
            and not torch.backends.mkldnn.enabled and not getattr(torch._C, "_get_nnpack_enabled", lambda: True)()
            and torch.get_num_threads() == PORTABLE_THREADS
            and torch.backends.cpu.get_cpu_capability() in BASELINE_CAPABILITIES)


def kernel_environment() -> dict:
    """The :data:`KERNEL_VARIABLES` set in this process's environment, name -> value."""
    return {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ}


def fingerprint() -> Dict[str, str]:
    """How this process's CPU kernels round: a SHA-256 digest (first 12 hex digits) of each of a few
    small computations the networks are made of, on fixed inputs, and ``all`` over them.

    Two processes with the same fingerprint computed these bit for bit alike; one entry that
    differs names the library path that does: ``gemm`` (MKL's matrix product), ``conv_train`` (a
    convolution with its gradients, as in training: oneDNN, or im2col and MKL), ``conv_inference``
    (a batch of 16 without gradients, as ``segment`` runs it: oneDNN, NNPACK or im2col),
    ``dilated`` (DRN's convolutions), ``norm`` (instance and batch norm), ``math`` (exp, log1p,
    tanh, sigmoid), ``random`` (the normal and uniform draws), ``resample`` (the augmentation's
    grid sampling and bicubic interpolation), ``reduce`` (a long sum). A CPU run's training and
    segmentation go through all of them, so a model whose recorded fingerprint differs from
    another's was computed along another path. Its inputs come from a private generator: torch's global one,
    which training draws from, is untouched. Some 10 ms.
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(20191013)

    def draw(*shape):
        return torch.randn(*shape, generator=gen)

    results: Dict[str, list] = {}
    results["gemm"] = [draw(64, 147) @ draw(147, 256)]
    # its own autograd mode: a caller under no_grad or inference_mode gets the same digests
    with torch.inference_mode(False), torch.enable_grad():
        x, w = draw(8, 16, 32, 32).requires_grad_(), draw(32, 16, 3, 3).requires_grad_()
        out = F.conv2d(x, w, padding=1)
        out.backward(draw(*out.shape))
    results["conv_train"] = [out, x.grad, w.grad]
    with torch.no_grad():
        results["conv_inference"] = [F.conv2d(draw(16, 16, 32, 32), w, padding=1)]
        v = draw(8, 16, 32, 32)
        results["dilated"] = [F.conv2d(v, w, padding=2, dilation=2)]
        results["norm"] = [F.instance_norm(v), F.batch_norm(v, None, None, training=True)]
        u = draw(4096)
        results["math"] = [u.exp(), u.abs().log1p(), u.tanh(), u.sigmoid()]
        results["random"] = [torch.randn(4096, generator=gen), torch.rand(4096, generator=gen)]
        theta = torch.eye(2, 3).repeat(2, 1, 1) + 0.1 * draw(2, 2, 3)
        img = draw(2, 3, 32, 32)
        results["resample"] = [F.grid_sample(img, F.affine_grid(theta, [2, 3, 32, 32], align_corners=False),
                                             align_corners=False),
                               F.interpolate(img, size=(48, 48), mode="bicubic", align_corners=True)]
        results["reduce"] = [draw(1 << 18).sum()]
    digests = {}
    overall = hashlib.sha256()
    for name, tensors in results.items():
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().contiguous().numpy().tobytes())
        digests[name] = h.hexdigest()[:12]
        overall.update(h.digest())
    digests["all"] = overall.hexdigest()[:12]
    return digests


def numerics() -> dict:
    """What decides the rounding of a CPU run: CPU model, torch threads, torch's vector kernels,
    any of :data:`KERNEL_VARIABLES` set in the environment, whether the run is portable, and the
    :func:`fingerprint` of the kernels these give."""
    import torch   # here, not at the top: the CLI imports this module before it needs torch
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "environment": kernel_environment(),
            "portable": portable(),
            "fingerprint": fingerprint()}


def description() -> str:
    """One line for a report, e.g. ``Intel(R) Xeon(R) Processor, 2 logical cores, no GPU, torch
    2.13.0+cpu, 2 threads, AVX512 kernels``, plus any kernel variable that is set, for a
    portable run ``portable numerics``, and ``kernel fingerprint`` with the :func:`fingerprint`'s
    ``all`` digest (two reports with the same one were computed along the same kernel paths)."""
    import torch
    n = numerics()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    text = (f"{n['cpu']}, {os.cpu_count()} logical cores, {gpu}, torch {torch.__version__}, "
            f"{n['threads']} thread{'' if n['threads'] == 1 else 's'}, {n['cpu_capability']} kernels")
    text += "".join(f", {k}={v}" for k, v in n["environment"].items())
    text += ", portable numerics" if n["portable"] else ""
    return text + f", kernel fingerprint {n['fingerprint']['all']}"
