"""Helpers shared by the benchmark scripts: machine description, timing, FLOP counting.

Timing the training stages goes through ``train.run_stage`` itself (augmentation, routed
gradients, both optimisers), on synthetic in-memory slices: :class:`StepClock` is a progress
reporter that timestamps the steps ``run_stage`` reports, so the timed window is the training
loop only (set-up and the final model write are outside it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "VAEUDASegmentation"))   # run from a checkout without `pip install -e .`

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from vaeuda import __version__ as ENGINE_VERSION, machine  # noqa: E402
from vaeuda.errors import VaeudaError, os_error_sentence, require_count  # noqa: E402
from vaeuda.fileio import atomic_path, check_output_file  # noqa: E402
from vaeuda.data import SliceSet, load_slices  # noqa: E402
from vaeuda.demo import evaluate_model, image_of, label_of  # noqa: E402
from vaeuda.labels import MMWHS  # noqa: E402
from vaeuda.nets import VAEUDANet, get_preset  # noqa: E402
from vaeuda.progress import Reporter, null_reporter  # noqa: E402
from vaeuda.train import ADAPT_TRAINING, Stage, TrainConfig, resolve_train_config, run_stage  # noqa: E402


# ----------------------------------------------------------------------------- the command line

def count(minimum: int = 1) -> Callable[[str], int]:
    """argparse type: a whole number of at least ``minimum``; anything else is the parser's usage
    error at start-up, not a traceback (a division by zero, an empty median) after minutes of work."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        try:
            require_count("", value, minimum)        # the engine's rule; argparse names the option
        except VaeudaError as exc:
            raise argparse.ArgumentTypeError(str(exc).strip().rstrip(".")) from None
        return value
    parse.__name__ = "count"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def run_main(main: Callable[[], Optional[int]]) -> int:
    """A script's exit status: what ``main`` returns, or, for an input the engine refuses or a path the
    OS refuses (the command line's rule, ``errors.os_error_sentence``), ``error: <one sentence>`` on
    stderr and status 1 (as the scripts' own handlers say it; a usage error is argparse's 2), and for
    Ctrl-C ``interrupted`` and 130. Any other OSError keeps its traceback: a bug to see whole."""
    try:
        return main() or 0
    except VaeudaError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except BrokenPipeError:                  # `script | head`: the reader went away, as the command line says it
        print("error: the output pipe was closed.", file=sys.stderr)
    except OSError as exc:
        sentence = os_error_sentence(exc)
        if sentence is None:
            raise
        print(f"error: {sentence}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


def check_output(path: Optional[str], inputs: Sequence = ()) -> None:
    """Refuse at start-up an output file path the script could only fail to write at its end."""
    if path:
        check_output_file(path, list(inputs))


# ----------------------------------------------------------------------------- the machine

def add_set_option(parser) -> None:
    """``--set NAME=VALUE`` (repeatable): override one of the engine's training options."""
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a training option (train.TrainConfig), e.g. lambda_adv=10 or "
                             "lr_scale='{\"enc_t\": 2}'; values are JSON; repeatable")


def parsed_set_options(parser, items: Sequence[str], option: str = "--set", example: str = "lambda_adv=10") -> dict:
    """``option``'s NAME=VALUE items as {name: JSON value}; a malformed one is the parser's usage error."""
    import json
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            sep = ""
        if not sep:
            parser.error(f"{option} {item}: expected NAME=VALUE with a JSON value, e.g. {example}")
    return overrides


def load_average() -> List[float]:
    """1, 5 and 15 minute load averages (other work on the machine makes timings slower)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def max_rss_bytes(who: int) -> int:
    """``resource.getrusage(who).ru_maxrss`` in bytes: Linux gives KiB, macOS bytes (``resource``
    is POSIX only: imported here, not when this module loads)."""
    import resource
    rss = resource.getrusage(who).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _cpu_features() -> List[str]:
    """The vector-unit flags that decide convolution speed (AVX2, AVX-512, bf16, AMX)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    try:
        for line in machine.CPUINFO.read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def machine_info() -> dict:
    """CPU model and features, cores, memory, GPU, torch and its thread count, the MKL / oneDNN /
    OpenMP variables set (``machine.KERNEL_VARIABLES``), and the load average now."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"engine": ENGINE_VERSION,
            "cpu": machine.cpu_model(), "cpu_features": _cpu_features(), "logical_cores": os.cpu_count(),
            "memory_gib": _memory_gib(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda, "kernel_environment": machine.kernel_environment(),
            "load_average": load_average()}


# ----------------------------------------------------------------------------- timing

def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> List[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


class StepClock(Reporter):
    """A silent progress reporter that remembers when ``run_stage`` reported each step."""

    def __init__(self, device: torch.device):
        super().__init__("none")
        self.device = device
        self.stamps: List[Tuple[int, float]] = []

    def step(self, step: int, force: bool = False, **metrics) -> None:
        sync(self.device)
        self.stamps.append((int(step), time.perf_counter()))

    def loop_seconds(self) -> Tuple[int, float]:
        """(iterations, seconds) between the first report (before the loop) and the last."""
        (first, t0), (last, t1) = self.stamps[0], self.stamps[-1]
        return last - first, t1 - t0


@contextlib.contextmanager
def forced_autocast(bf16: bool) -> Iterator[None]:
    """bf16 autocast on or off for the code inside, whatever the device.

    ``train.run_stage`` switches bf16 on by device type (CUDA) and has no option for it, and
    ``predict.slice_probabilities`` can only add it on the CPU (``cpu_bf16``), not take it off on
    CUDA, so benchmarks swap ``torch.autocast`` for a version with ``enabled`` fixed. Only for
    measuring: the engine itself is untouched.
    """
    real = torch.autocast

    class Forced(real):  # type: ignore[misc, valid-type]
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            super().__init__(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache_enabled)

    torch.autocast = Forced  # type: ignore[misc]
    try:
        yield
    finally:
        torch.autocast = real  # type: ignore[misc]


def synthetic_slices(n: int, size: int, labelled: bool, seed: int = 0) -> SliceSet:
    """``n`` random model input slices (n, 3, size, size); with labels, a disc of each structure
    on most slices (so class weights and slice sampling behave as on real data)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=gen)
    labels = None
    if labelled:
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        labels = torch.zeros(n, size, size, dtype=torch.uint8)
        for i in range(n):
            if i % 4 == 3:
                continue            # a quarter of the slices show nothing, like slices off the heart
            for c in range(1, 5):
                cy, cx = (torch.rand(2, generator=gen) * size * 0.6 + size * 0.2).tolist()
                r = size * 0.08
                labels[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
    return SliceSet(images, labels, torch.zeros(n, dtype=torch.int32), ["synthetic"])


def cohort_slices(cohort: Path, prefixes: Sequence[str], net_cfg, normalisation: dict,
                  labelled: bool = False) -> SliceSet:
    """The model slices of a cohort's scans (``vaeuda synth`` names, MM-WHS labels) on the grid of
    ``net_cfg`` (a model's ``NetConfig``): images (N, 3, S, S), with labels (N, S, S) if ``labelled``."""
    return load_slices([image_of(cohort, s) for s in prefixes], net_cfg.input_size, net_cfg.slice_fov_mm,
                       normalisation, [label_of(cohort, s) for s in prefixes] if labelled else None, MMWHS)


def engine_commit() -> Optional[str]:
    import subprocess
    try:
        done = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def write_record(path, record: dict) -> None:
    """A study's JSON record, written whole or not at all (an interrupted write leaves the old file),
    with the machine it was measured on unless the record names one, and the engine's commit
    (``git describe --always --dirty``; None outside a git checkout): the defaults a run took
    (e.g. ``iterations: null``) are those of that commit."""
    record = record if "machine" in record else {**record, "machine": machine_info()}
    record.setdefault("engine_commit", engine_commit())
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def scored_dice(model: Path, cohort: Path, prefixes: Sequence[str], out_dir: Path) -> Dict[str, float]:
    """Mean Dice [%] per structure and ``Mean`` of ``model`` on the cohort scans ``prefixes``, on the CPU
    (``demo.evaluate_model``, predictions written into ``out_dir``), rounded to 0.01."""
    result = evaluate_model(model, cohort, prefixes, out_dir, "cpu", null_reporter())
    return {k: round(100 * v["dice"]["mean"], 2) for k, v in result["summary"].items()}


def stage_throughput(preset: str, stage: str, batch: int, iterations: int, repeats: int, device: torch.device,
                     bf16: Optional[bool] = None, warmup: int = 1) -> dict:
    """Training images per second of ``stage`` ("source" or "adapt") at ``preset``.

    Each repeat is one ``run_stage`` of ``iterations``; ``warmup`` iterations run first in a
    separate ``run_stage`` (first-call costs: kernel selection, allocator). One image is one
    source slice of the batch (the adaptation stage also draws as many target slices).
    ``bf16``: None leaves the engine's own choice (bf16 on CUDA only), else forces it.
    Returns medians and every repeat, plus the peak CUDA memory of the timed runs.
    """
    cfg = get_preset(preset)
    size = cfg.input_size
    n = max(4 * batch, 32)
    source = synthetic_slices(n, size, labelled=True, seed=1)
    target = synthetic_slices(n, size, labelled=False, seed=2) if stage == "adapt" else None
    torch.manual_seed(0)
    net = VAEUDANet(cfg)
    # the engine's stage options (adaptation: its learning rate and weight average), minus the
    # checkpoints and held-out evaluations, which are not training
    train_cfg = resolve_train_config(None, batch, preset, ADAPT_TRAINING.get(preset, {}) if stage == "adapt" else None)
    train_cfg.class_weights = (1.0,) * cfg.n_classes
    train_cfg.checkpoint_every = train_cfg.eval_every = 10 ** 9
    rates: List[float] = []
    peak = None
    with tempfile.TemporaryDirectory() as tmp, \
            (forced_autocast(bf16) if bf16 is not None else contextlib.nullcontext()):
        def run(iters: int) -> StepClock:
            clock = StepClock(device)
            out = Path(tmp) / f"{stage}.safetensors"
            run_stage(net, Stage(stage, source, target, iters, out, {"stage": stage, "provenance": {}}),
                      train_cfg, device, seed=0, reporter=clock)
            return clock
        if warmup:
            run(warmup)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            its, seconds = run(iterations).loop_seconds()
            rates.append(its * batch / seconds)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    return {"preset": preset, "stage": stage, "batch": batch, "iterations": iterations, "repeats": repeats,
            "images_per_s": median(rates), "all_images_per_s": [round(r, 3) for r in rates],
            "seconds_per_iteration": batch / median(rates), "peak_cuda_bytes": peak}


# ----------------------------------------------------------------------------- FLOPs

def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()`` as torch's FlopCounterMode counts them
    (2 per multiply-add of convolutions and matrix products; other ops count 0). Counted outside
    inference mode (in no_grad where the caller was in it): torch 2.1's counter sees nothing inside it."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    grad = torch.is_grad_enabled()          # (inference_mode(False) turns gradients on)
    with torch.inference_mode(False), torch.set_grad_enabled(grad), counter:
        fn()
    return int(counter.get_total_flops())


def network_flops(preset: str) -> Dict[str, int]:
    """Forward FLOPs per image of each network of ``preset`` and of the inference path
    (E_S -> E_Z -> Seg on the posterior mean)."""
    cfg = get_preset(preset)
    net = VAEUDANet(cfg).eval()
    x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    with torch.inference_mode():
        h = net.enc_s(x)
        mu, _ = net.enc_z(h)
        d = net.dec_z(mu)
        parts = {"E_S / E_T": lambda: net.enc_s(x), "E_Z": lambda: net.enc_z(h), "D_Z": lambda: net.dec_z(mu),
                 "D_S / D_T": lambda: net.dec_s(d), "Seg (DRN)": lambda: net.seg(mu), "Disc": lambda: net.disc(x)}
        flops = {name: count_flops(fn) for name, fn in parts.items()}
        flops["inference path"] = count_flops(lambda: net.segment_logits(x, "source"))
    return flops


def training_flops_per_image(preset: str, stage: str, batch: int) -> int:
    """FLOPs of one training iteration (forward and backward of every term, both optimiser
    steps' matrix products) divided by the batch size."""
    cfg = get_preset(preset)
    source = synthetic_slices(max(2 * batch, 8), cfg.input_size, labelled=True, seed=1)
    target = synthetic_slices(max(2 * batch, 8), cfg.input_size, labelled=False, seed=2) if stage == "adapt" else None
    torch.manual_seed(0)
    net = VAEUDANet(cfg)
    train_cfg = TrainConfig(batch_size=batch, class_weights=(1.0,) * cfg.n_classes,
                            checkpoint_every=10 ** 9, eval_every=10 ** 9)
    with tempfile.TemporaryDirectory() as tmp:
        stage_ = Stage(stage, source, target, 1, Path(tmp) / "m.safetensors", {"stage": stage, "provenance": {}})
        flops = count_flops(lambda: run_stage(net, stage_, train_cfg, torch.device("cpu"), seed=0,
                                              reporter=Reporter("none")))
    return flops // batch


# ----------------------------------------------------------------------------- attainable conv rate

def conv_calls(net: nn.Module, run: Callable[[], object]) -> List[Tuple[nn.Conv2d, Tuple[int, ...]]]:
    """Every Conv2d call ``run()`` makes on ``net``: (module, input shape), in call order."""
    calls: List[Tuple[nn.Conv2d, Tuple[int, ...]]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: calls.append((mod, tuple(inp[0].shape))))
             for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return calls


def attainable_conv_rate(calls: Sequence[Tuple[nn.Conv2d, Tuple[int, ...]]], device: torch.device,
                         repeats: int = 5, channels_last: bool = False) -> dict:
    """Time each convolution of ``calls`` alone in a tight loop (inference mode, same shapes,
    weights and padding; padding-free convolutions of the reflect-padded inputs).

    Returns {"flops", "seconds", "gflops_per_s"}: the summed convolution FLOPs and the summed
    median times, i.e. the rate torch reaches on exactly these convolutions with nothing else
    in between (the "attainable" rate the whole network is compared with).
    """
    total_flops, total_seconds = 0, 0.0
    memo: Dict[tuple, Tuple[int, float]] = {}
    with torch.inference_mode():
        for conv, shape in calls:
            key = (shape, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation)
            if key not in memo:
                x = torch.randn(shape, device=device)
                weight = conv.weight.detach().to(device)
                bias = None if conv.bias is None else conv.bias.detach().to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                    weight = weight.contiguous(memory_format=torch.channels_last)

                def one(x=x, weight=weight, bias=bias, conv=conv):
                    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
                flops = count_flops(one)
                seconds = median(time_call(one, device, repeats, warmup=2))
                memo[key] = (flops, seconds)
            flops, seconds = memo[key]
            total_flops += flops
            total_seconds += seconds
    return {"flops": total_flops, "seconds": total_seconds, "gflops_per_s": total_flops / total_seconds / 1e9}


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """GFLOP/s of an n x n matrix product: the machine's dense peak as torch sees it."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median(time_call(lambda: a @ b, device, repeats, warmup=2))
    return 2 * n ** 3 / seconds / 1e9


# ----------------------------------------------------------------------------- volumes, tables

def random_volume(size_xyz: Sequence[int], spacing: Sequence[float] = (0.8, 0.8, 1.0), seed: int = 0):
    """A float32 SimpleITK image of ``size_xyz`` voxels (x, y, z) with CT-like random values,
    identity direction (already LPS: y, the coronal axis, gives the slices)."""
    import SimpleITK as sitk
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in size_xyz)
    array = rng.standard_normal((nz, ny, nx), dtype=np.float32)
    array *= 200.0
    image = sitk.GetImageFromArray(array)
    del array
    image.SetSpacing([float(s) for s in spacing])
    return image


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: Optional[str] = None) -> str:
    """A Markdown table; ``align`` one character per column, "l" or "r" (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
