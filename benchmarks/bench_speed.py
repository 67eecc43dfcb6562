"""Speed and memory of the engine on this machine's CPU, against the machine's own limits.

    .venv/bin/python benchmarks/bench_speed.py --out Docs/benchmarks.md        # `make bench`
    .venv/bin/python benchmarks/bench_speed.py --smoke --out /tmp/b.md         # CI-size run, seconds

Measures, per preset (``--presets``, default ``cpu paper``):

* training throughput (images/s) of the source and the adaptation stage, through
  ``train.run_stage`` on synthetic in-memory slices (median over repeats);
* FLOPs per image of every network (``torch.utils.flop_counter``), and the rate reached by the
  inference path against the rate torch reaches on the same convolutions alone (achieved /
  attainable) and against a large matrix product (the dense peak);
* inference time for one volume: a 256 x 256 x 200 coronal stack at ``paper``, the demo's
  synthetic CT at ``cpu`` (``predict.segment_image``);
* peak resident memory for segmenting a 512 x 512 x 300 volume (``cpu`` preset, own process);
* inference variants: ``torch.no_grad`` vs ``inference_mode``, batch size, channels-last,
  one thread, bf16 autocast on the CPU, ``torch.compile``.

Writes the Markdown report to ``--out`` and everything measured to ``--json`` (default: the
report's name with ``.json``). A GPU section comes from ``--gpu-json`` (bench_gpu.py's output)
when that file exists. Timings are wall clock; the load average before and after each section
is recorded because other work on the machine slows everything down.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

from common import (REPO, attainable_conv_rate, check_output, conv_calls, count, load_average, machine_info,
                    matmul_rate, max_rss_bytes, md_table, median, network_flops, random_volume, run_main,
                    stage_throughput, time_call, training_flops_per_image)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vaeuda.choices import PRESET_NAMES  # noqa: E402
from vaeuda.errors import VaeudaError  # noqa: E402
from vaeuda.fileio import atomic_path  # noqa: E402
from vaeuda.modelfile import load_model  # noqa: E402
from vaeuda.nets import VAEUDANet, get_preset  # noqa: E402
from vaeuda.predict import segment_image, slice_probabilities  # noqa: E402
from vaeuda.volumes import DEFAULT_NORMALISATION, SliceGrid  # noqa: E402

CPU = torch.device("cpu")
META = {"normalisation": dict(DEFAULT_NORMALISATION)}

# How much each section does, full run and smoke run: (batch, timed iterations, repeats, warm-up iterations).
TRAIN = {"full": {"tiny": (2, 10, 3, 2), "cpu": (8, 5, 3, 2), "paper": (2, 1, 1, 0)},
         "smoke": {"tiny": (2, 2, 1, 1), "cpu": (2, 1, 1, 1), "paper": (1, 1, 1, 0)}}
# Inference rate: (slices, batch, repeats).
RATE = {"full": {"tiny": (64, 16, 5), "cpu": (64, 16, 5), "paper": (8, 4, 2)},
        "smoke": {"tiny": (8, 8, 1), "cpu": (8, 8, 1), "paper": (1, 1, 1)}}
HELPS = 1.05            # a variant "helps" when it is at least 5% faster than the engine as it is
ONE_THREAD, ONE_THREAD_PREFIX = "1 thread (torch.set_num_threads(1))", "1 thread + "


def section(results: dict, name: str):
    """A runner for one section that records its time and the load average before and after."""
    def run(fn, *args, **kw):
        before = load_average()
        t = time.time()
        value = fn(*args, **kw)
        results["load"][name] = {"before": before, "after": load_average(), "seconds": round(time.time() - t, 1)}
        print(f"[bench] {name}: {time.time() - t:.1f} s", file=sys.stderr, flush=True)
        return value
    return run


# ----------------------------------------------------------------------------- measurements

def measure_training(presets: List[str], mode: str) -> List[dict]:
    rows = []
    for preset in presets:
        batch, iters, repeats, warmup = TRAIN[mode][preset]
        for stage in ("source", "adapt"):
            # FLOPs per image do not depend on the batch: counted on one image (it also warms the kernels up)
            flops = training_flops_per_image(preset, stage, 1)
            r = stage_throughput(preset, stage, batch, iters, repeats, CPU, warmup=warmup)
            r["train_flops_per_image"] = flops
            r["achieved_gflops_per_s"] = r["train_flops_per_image"] * r["images_per_s"] / 1e9
            rows.append(r)
    return rows


def measure_inference_rate(presets: List[str], mode: str) -> List[dict]:
    """The inference path on a stack of slices: achieved rate, and the same convolutions alone."""
    rows = []
    peak = matmul_rate(CPU, n=512 if mode == "smoke" else 2048, repeats=2 if mode == "smoke" else 5)
    for preset in presets:
        n, batch, repeats = RATE[mode][preset]
        cfg = get_preset(preset)
        torch.manual_seed(0)
        net = VAEUDANet(cfg).eval()
        slices = np.random.default_rng(0).standard_normal((n, 3, cfg.input_size, cfg.input_size), dtype=np.float32)
        flops = network_flops(preset)["inference path"]
        seconds = median(time_call(lambda: slice_probabilities(net, slices, "source", CPU, batch), CPU, repeats))
        x = torch.from_numpy(slices[:batch])
        with torch.inference_mode():
            calls = conv_calls(net, lambda: net.segment_logits(x, "source"))
        conv = attainable_conv_rate(calls, CPU, repeats=max(repeats, 2))
        achieved = flops * n / seconds / 1e9
        rows.append({"preset": preset, "slices": n, "batch": batch, "flops_per_image": flops,
                     "seconds": seconds, "slices_per_s": n / seconds, "achieved_gflops_per_s": achieved,
                     "attainable_conv_gflops_per_s": conv["gflops_per_s"], "conv_flops_share": conv["flops"] / (flops * batch),
                     "achieved_over_attainable": achieved / conv["gflops_per_s"], "matmul_peak_gflops_per_s": peak,
                     "attainable_over_peak": conv["gflops_per_s"] / peak, "n_convs": len(calls)})
    return rows


def measure_volumes(presets: List[str], mode: str, paper_slices: int) -> List[dict]:
    """One whole volume through predict.segment_image (slicing, network, resampling back)."""
    rows = []
    for preset in presets:
        cfg = get_preset(preset)
        torch.manual_seed(0)
        net = VAEUDANet(cfg).eval()
        if preset == "paper":
            size = (256, paper_slices if mode == "full" else 2, 256)
            image, what = random_volume(size), f"random {size[0]}x{size[2]} coronal stack, {size[1]} slices"
            repeats, warmup = 1, 0       # minutes per call on a CPU; the inference-rate section warmed these shapes up
        elif preset == "cpu" and mode == "full":
            from vaeuda.phantom import cohort_subject_seed, make_subject
            image, _ = make_subject("ct", cohort_subject_seed(0, "ct", 0))
            what, repeats, warmup = "demo CT (phantom ct_1001, {}x{}x{})".format(*image.GetSize()), 3, 1
        else:
            size = (2 * cfg.input_size, 16, 2 * cfg.input_size)
            image, what, repeats, warmup = random_volume(size), "random {}x{}x{}".format(*size), 1, 1
        n_slices = SliceGrid.from_image(image, cfg.input_size, cfg.slice_fov_mm).n_slices
        times = time_call(lambda: segment_image(net, META, image, CPU, domain="source"), CPU, repeats, warmup=warmup)
        rows.append({"preset": preset, "volume": what, "size_xyz": list(image.GetSize()), "slices": n_slices,
                     "seconds": median(times), "all_seconds": [round(t, 3) for t in times],
                     "seconds_per_slice": median(times) / n_slices})
    return rows


def measure_memory(mode: str, preset: str, threads: int) -> dict:
    """Peak RSS of segmenting a big volume, in a child process (its peak is its own)."""
    size = (512, 512, 300) if mode == "full" else (64, 64, 32)
    child = Path(__file__).with_name("segment_memory.py")
    before = max_rss_bytes(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(child), *map(str, size), preset, str(threads)], capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"segment_memory.py failed: {proc.stderr.strip()[-500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # RUSAGE_CHILDREN is the largest child so far, and on Linux a child's ru_maxrss starts from
    # this (parent) process's peak, carried over fork + exec: an upper bound, kept for comparison.
    children = max_rss_bytes(resource.RUSAGE_CHILDREN)
    result["rusage_children_peak"] = children if children > before else None
    result["parent_peak_at_spawn"] = max_rss_bytes(resource.RUSAGE_SELF)
    result["peak_over_input"] = result["rss_peak"] / result["input_bytes"]
    result["extra_over_input"] = (result["rss_peak"] - result["rss_after_import"]) / result["input_bytes"]
    return result


def _infer(net, slices: np.ndarray, batch: int, inference_mode: bool = True, channels_last: bool = False,
           bf16: bool = False, logits: bool = False) -> np.ndarray:
    """predict.slice_probabilities with its choices as switches (the variants below).
    ``logits``: return the float32 logits instead of float16 probabilities (to compare results)."""
    out = np.empty((slices.shape[0], net.cfg.n_classes) + slices.shape[2:], dtype=np.float32 if logits else np.float16)
    grad = torch.inference_mode() if inference_mode else torch.no_grad()
    with grad, torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, slices.shape[0], batch):
            x = torch.from_numpy(slices[start:start + batch])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            scores = net.segment_logits(x, "source").float()
            out[start:start + x.shape[0]] = scores.numpy() if logits else torch.softmax(scores, 1).numpy()
    return out


def measure_variants(preset: str, mode: str, threads: int, model: Optional[str] = None) -> dict:
    """Inference variants on one stack of slices, timed round-robin (so load changes hit all alike).

    Each variant is also run once for its result: the largest logit difference from the fp32
    engine relative to the largest logit, and the share of pixels whose arg-max class agrees.
    ``model``: a model file to use instead of random weights (agreement then means something).
    """
    n, _, repeats = RATE[mode][preset]
    n = max(n, 16) if mode == "full" else n
    if model:
        net, _ = load_model(model)
        cfg = net.cfg
        preset = f"{cfg.input_size}px model {Path(model).name}"
    else:
        cfg = get_preset(preset)
        torch.manual_seed(0)
        net = VAEUDANet(cfg).eval()
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    slices = np.random.default_rng(0).standard_normal((n, 3, cfg.input_size, cfg.input_size), dtype=np.float32)

    def one_thread(model=None, batch=16, **kw):
        torch.set_num_threads(1)
        try:
            return _infer(model or net, slices, batch, **kw)
        finally:
            torch.set_num_threads(threads)

    # name -> function(logits: bool) running the variant
    variants = OrderedDict([
        ("engine: predict.slice_probabilities (inference_mode, batch 16)",
         lambda logits=False: _infer(net, slices, 16, logits=True) if logits
         else slice_probabilities(net, slices, "source", CPU, 16)),
        ("torch.no_grad instead of inference_mode",
         lambda logits=False: _infer(net, slices, 16, inference_mode=False, logits=logits)),
        ("batch 1", lambda logits=False: _infer(net, slices, 1, logits=logits)),
        ("batch 4", lambda logits=False: _infer(net, slices, 4, logits=logits)),
        ("batch 64", lambda logits=False: _infer(net, slices, 64, logits=logits)),
        ("channels_last (model and input)", lambda logits=False: _infer(net_cl, slices, 16, channels_last=True,
                                                                        logits=logits)),
        (ONE_THREAD, lambda logits=False: one_thread(logits=logits)),
        ("bf16 autocast on the CPU", lambda logits=False: _infer(net, slices, 16, bf16=True, logits=logits)),
        ("1 thread + batch 64", lambda logits=False: one_thread(logits=logits, batch=64)),
        ("1 thread + channels_last", lambda logits=False: one_thread(logits=logits, model=net_cl, channels_last=True)),
        ("1 thread + bf16 autocast", lambda logits=False: one_thread(logits=logits, bf16=True)),
    ])
    reference = _infer(net, slices, 16, logits=True)
    scale = float(np.abs(reference).max()) or 1.0
    ref_classes = reference.argmax(1)
    agreement = {}
    for name, fn in variants.items():          # also the warm-up
        scores = fn(logits=True)
        agreement[name] = (float(np.abs(scores - reference).max()) / scale, float((scores.argmax(1) == ref_classes).mean()))
        fn()
    times: Dict[str, List[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    first = next(iter(variants))
    base, base_best = median(times[first]), min(times[first])
    rows = [{"variant": k, "median_s": median(v), "best_s": min(v), "slices_per_s": n / median(v),
             "speedup": base / median(v), "speedup_best": base_best / min(v),
             "rel_logit_diff": agreement[k][0], "argmax_agreement": agreement[k][1]} for k, v in times.items()]
    return {"preset": preset, "slices": n, "repeats": repeats, "threads": threads, "model": model, "rows": rows}


COMPILE_CHILD = "--compile-child"


def compile_child(preset: str, n: int, batch: int, threads: int) -> None:
    """In its own process: eager vs torch.compile'd inference path, with the compile time."""
    torch.set_num_threads(threads)
    cfg = get_preset(preset)
    torch.manual_seed(0)
    net = VAEUDANet(cfg).eval()
    x = torch.randn(batch, 3, cfg.input_size, cfg.input_size)

    class Path_(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.segment_logits(x, "source")

    eager = Path_().eval()
    with torch.inference_mode():
        eager_s = median(time_call(lambda: eager(x), CPU, 5, warmup=2))
        t = time.perf_counter()
        compiled = torch.compile(eager)
        compiled(x)
        compile_s = time.perf_counter() - t
        compiled_s = median(time_call(lambda: compiled(x), CPU, 5, warmup=2))
        diff = float((compiled(x) - eager(x)).abs().max())
    print(json.dumps({"preset": preset, "batch": batch, "threads": threads, "eager_s": eager_s, "compiled_s": compiled_s,
                      "compile_s": compile_s, "speedup": eager_s / compiled_s, "max_abs_logit_diff": diff}))


def measure_compile(preset: str, timeout: int, threads: int) -> dict:
    proc_args = [sys.executable, __file__, COMPILE_CHILD, preset, "16", "16", str(threads)]
    t = time.time()
    try:
        proc = subprocess.run(proc_args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"preset": preset, "ok": False, "why": f"did not finish within {timeout} s (compile + timing)"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return {"preset": preset, "ok": False, "why": f"failed after {time.time() - t:.0f} s: {last[:300]}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), ok=True)


THREADS_CHILD = "--threads-child"
# (label, torch threads or None for torch's default, extra environment): OpenMP settings must be
# in the environment before torch starts, so each runs in its own process.
THREAD_CONFIGS = [("torch default", None, {}),
                  ("1 thread", 1, {}),
                  ("torch default, OMP_WAIT_POLICY=PASSIVE", None, {"OMP_WAIT_POLICY": "PASSIVE"})]


def threads_child(preset: str, slices: int, repeats: int, train_iterations: int, threads: Optional[int]) -> None:
    """In its own process: inference (fp32, bf16) and source-stage training speed at these thread settings."""
    if threads:
        torch.set_num_threads(threads)
    cfg = get_preset(preset)
    torch.manual_seed(0)
    net = VAEUDANet(cfg).eval()
    x = np.random.default_rng(0).standard_normal((slices, 3, cfg.input_size, cfg.input_size), dtype=np.float32)
    runs = {"fp32": lambda: _infer(net, x, 16), "bf16": lambda: _infer(net, x, 16, bf16=True)}
    times: Dict[str, List[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    train = stage_throughput(preset, "source", 8, train_iterations, 1, CPU, warmup=1) if train_iterations else None
    print(json.dumps({"threads": torch.get_num_threads(),
                      **{f"infer_{k}_slices_per_s": slices / median(v) for k, v in times.items()},
                      **{f"infer_{k}_best_slices_per_s": slices / min(v) for k, v in times.items()},
                      "train_source_images_per_s": train["images_per_s"] if train else None}))


def measure_threads(preset: str, mode: str) -> List[dict]:
    """Thread count and OpenMP wait policy, each in a fresh process (see THREAD_CONFIGS)."""
    import os
    slices, repeats, iters = (64, 5, 3) if mode == "full" else (8, 1, 1)
    rows = []
    # smoke: one configuration, enough to exercise the code (the default one can be slow on a busy machine)
    for label, threads, env in (THREAD_CONFIGS if mode == "full" else THREAD_CONFIGS[1:2]):
        args = [sys.executable, __file__, THREADS_CHILD, preset, str(slices), str(repeats), str(iters), str(threads or 0)]
        child_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        child_env.update(env)
        proc = subprocess.run(args, capture_output=True, text=True, timeout=1800, env=child_env)
        if proc.returncode != 0:
            raise RuntimeError(f"thread trial '{label}' failed: {proc.stderr.strip()[-500:]}")
        rows.append(dict(json.loads(proc.stdout.strip().splitlines()[-1]), config=label, env=env,
                         load_after=load_average()))
    return rows


# ----------------------------------------------------------------------------- report

def _load_sentence(results: dict) -> str:
    """Whether other work shared the machine, from the 1-minute load averages around each section,
    less the benchmark's own threads (a 1-thread run on an idle machine reads a load of about 1)."""
    cores = results["machine"]["logical_cores"] or 1
    own = results["settings"].get("threads") or cores
    threads = "thread" if own == 1 else "threads"
    loads = [v[0] for section_ in results["load"].values() for v in (section_["before"], section_["after"]) if v]
    lo, hi = (min(loads), max(loads)) if loads else (0.0, 0.0)
    shared = (f"Other work was running: the 1-minute load average was {lo:.1f} to {hi:.1f} on {cores} logical "
              "cores, so the benchmark shared the CPU and its times are slower and noisier than on an idle machine."
              if hi - own >= 0.5 * cores else
              f"The machine was otherwise idle (1-minute load average {lo:.1f} to {hi:.1f} on {cores} logical cores, "
              f"the benchmark's own {own} {threads} included).")
    return (shared + " Medians are over repeats; \"best\" is the fastest repeat, the closest to an idle machine. "
            "Load before and after each section:")



def report(results: dict, gpu: Optional[dict], notes: str = "", cpu_json: str = "CPU_RUN.json") -> str:
    """The Markdown page. ``cpu_json``: where these CPU measurements are kept (named in the GPU
    section's command that folds a GPU run in)."""
    m, s = results["machine"], results["settings"]
    lines = [
        "# Benchmarks", "",
        f"Measured by `{s['command']}` ({'smoke run: sizes cut to seconds' if s['smoke'] else 'full run'}), "
        f"{results['date']}" + (f"; this page rendered from `{results['rendered_from']}`."
                                if results.get("rendered_from") else "."), "",
        "## Machine", "",
        md_table(["", ""], [["engine", m.get("engine", "0.1.0 (before runs recorded it)")], ["CPU", m["cpu"]], ["CPU features", ", ".join(m.get("cpu_features") or ["not recorded"])],
                            ["logical cores", m["logical_cores"]],
                            ["memory", f"{m['memory_gib']} GiB"], ["GPU", m["gpu"] or "none"],
                            ["torch", m["torch"]], ["torch threads", m["torch_threads"]],
                            ["python", m["python"]],
                            ["load average (1, 5, 15 min) at start", ", ".join(map(str, m["load_average"]))]], "ll"),
        _load_sentence(results), "",
        md_table(["section", "seconds", "load before", "load after"],
                 [[k, v["seconds"], ", ".join(map(str, v["before"])), ", ".join(map(str, v["after"]))]
                  for k, v in results["load"].items()], "lrll"),
    ]
    fl = results.get("flops", {})
    if fl:
        names = list(next(iter(fl.values())))
        lines += ["## FLOPs per image (forward)", "",
                  "Counted with `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add of convolutions and "
                  "matrix products; normalisation, activations and resampling count 0). GFLOP per 3-channel slice.", "",
                  md_table(["network"] + list(fl), [[n] + [fl[p][n] / 1e9 for p in fl] for n in names])]
    tr = results.get("training", [])
    if tr:
        lines += ["## Training throughput (CPU)", "",
                  "`train.run_stage` on synthetic slices: augmentation, all loss terms, routed gradients, both "
                  "optimisers. Images/s counts source slices (the adaptation stage also draws as many target "
                  "slices). Training GFLOP/image is the whole iteration, forward and backward, per source slice.", "",
                  md_table(["preset", "stage", "batch", "iterations x repeats", "images/s (median)",
                            "s/iteration", "train GFLOP/image", "achieved GFLOP/s"],
                           [[r["preset"], r["stage"], r["batch"], f"{r['iterations']} x {r['repeats']}",
                             r["images_per_s"], r["seconds_per_iteration"], r["train_flops_per_image"] / 1e9,
                             r["achieved_gflops_per_s"]] for r in tr], "llrlrrrr")]
        by = {(r["preset"], r["stage"]): r for r in tr}
        ratio = [f"{p}: adaptation / source time per image = "
                 f"{by[(p, 'source')]['images_per_s'] / by[(p, 'adapt')]['images_per_s']:.2f}"
                 for p in dict.fromkeys(r["preset"] for r in tr) if (p, "adapt") in by]
        lines += ["; ".join(ratio) + ".", ""]
    ir = results.get("inference_rate", [])
    if ir:
        lines += ["## Inference against the limit (CPU)", "",
                  "Achieved: the inference path (E_S -> E_Z -> Seg, `predict.slice_probabilities`) on a stack of "
                  "slices. Attainable: the same convolutions (same shapes, weights, strides, dilations) timed alone "
                  "in a tight loop with `F.conv2d`, summed: what torch reaches on this work with nothing in between. "
                  "Peak: a large fp32 matrix product.", "",
                  md_table(["preset", "GFLOP/slice", "slices (batch)", "slices/s", "achieved GFLOP/s",
                            "attainable conv GFLOP/s", "achieved / attainable", "matmul peak GFLOP/s",
                            "attainable / peak"],
                           [[r["preset"], r["flops_per_image"] / 1e9, f"{r['slices']} ({r['batch']})",
                             r["slices_per_s"], r["achieved_gflops_per_s"], r["attainable_conv_gflops_per_s"],
                             f"{100 * r['achieved_over_attainable']:.0f}%", r["matmul_peak_gflops_per_s"],
                             f"{100 * r['attainable_over_peak']:.0f}%"] for r in ir], "lrlrrrrrr")]
    vo = results.get("volumes", [])
    if vo:
        lines += ["## Inference time per volume (CPU)", "",
                  "`predict.segment_image`: normalise, cut into slices, run the network, resample the class "
                  "scores back onto the input grid, arg-max. Random weights (the time does not depend on them).", "",
                  md_table(["preset", "volume", "coronal slices", "seconds (median)", "s/slice"],
                           [[r["preset"], r["volume"], r["slices"], r["seconds"], r["seconds_per_slice"]]
                            for r in vo], "llrrr")]
        paper = [r for r in vo if r["preset"] == "paper"]
        if paper and paper[0]["slices"] != 200:
            lines += [f"The paper-preset volume had {paper[0]['slices']} slices here (`--paper-slices`); at the "
                      f"same rate 200 slices take about {200 * paper[0]['seconds_per_slice']:.0f} s.", ""]
    me = results.get("memory")
    if me:
        mib = 2 ** 20
        lines += ["## Peak memory segmenting a large volume", "",
                  f"`predict.segment_image` on a random {'x'.join(map(str, me['size_xyz']))} float32 volume "
                  f"({me['input_bytes'] / mib:.0f} MiB as float32) at the `{me['preset']}` preset, in a child process "
                  "(`benchmarks/segment_memory.py`); peak resident set size.", "",
                  md_table(["", "MiB"], [["after imports and model", me["rss_after_import"] / mib],
                                         ["with the input volume in memory", me["rss_with_input"] / mib],
                                         ["peak while segmenting", me["rss_peak"] / mib],
                                         ["parent's getrusage(RUSAGE_CHILDREN) (see below)",
                                          None if me["rusage_children_peak"] is None
                                          else me["rusage_children_peak"] / mib],
                                         ["parent's own peak when it started the child",
                                          me.get("parent_peak_at_spawn", 0) / mib]]),
                  "The child's figures are its VmHWM (/proc/self/status). `getrusage(RUSAGE_CHILDREN)` in the "
                  "parent is not this child's own peak on Linux: the kernel carries the parent's high-water mark "
                  "over fork + exec into the child's `ru_maxrss`, so it reads at least the parent's own peak.", "",
                  f"Peak above the imports = {me['extra_over_input']:.1f} x the input volume; it took "
                  f"{me['seconds']:.1f} s. Slices go through the network in batches and class scores stay on the "
                  "model's small slice grid (float16) until they are resampled one class at a time, so the peak "
                  "grows with the input volume, not with the number of classes.", ""]
    va = results.get("variants")
    if va:
        rows_by = {r["variant"]: r for r in va["rows"]}
        engine, single = va["rows"][0], rows_by.get(ONE_THREAD)

        def baseline(r: dict) -> dict:
            """Combinations with one thread compare with one thread, the rest with the engine."""
            return single if single and r["variant"].startswith(ONE_THREAD_PREFIX) else engine
        lines += ["## Inference variants (CPU)", "",
                  f"`{va['preset']}` preset, {va['slices']} slices, {va['repeats']} repeats timed round-robin, "
                  f"{va['threads']} threads unless stated. Speed-up = baseline median / variant median (>1: faster), "
                  "baseline being \"1 thread\" for the \"1 thread + X\" rows and the engine for the others; "
                  "best = the same on the fastest repeats. Logit diff: largest difference from the engine's fp32 "
                  "logits relative to the largest logit; arg-max: share of pixels with the same class"
                  + (" (random weights: only a rough check)." if not va.get("model") else "."), "",
                  md_table(["variant", "median s", "best s", "slices/s", "speed-up", "speed-up (best)",
                            "rel. logit diff", "arg-max agrees"],
                           [[r["variant"], r["median_s"], r["best_s"], r["slices_per_s"],
                             f"{baseline(r)['median_s'] / r['median_s']:.2f}",
                             f"{baseline(r)['best_s'] / r['best_s']:.2f}", f"{r['rel_logit_diff']:.1e}",
                             f"{100 * r['argmax_agreement']:.2f}%"] for r in va["rows"]], "lrrrrrrr")]
        th = results.get("threads")
        if th:
            lines += ["### Threads and the OpenMP wait policy", "",
                      f"The same `{va['preset']}`-preset inference (batch 16) and source-stage training (batch 8), each "
                      "configuration in a fresh process (OpenMP reads its settings when torch starts).", "",
                      md_table(["configuration", "threads", "inference fp32 slices/s (best)",
                                "inference bf16 slices/s (best)", "training images/s", "load after"],
                               [[r["config"], r["threads"],
                                 f"{r['infer_fp32_slices_per_s']:.1f} ({r['infer_fp32_best_slices_per_s']:.1f})",
                                 f"{r['infer_bf16_slices_per_s']:.1f} ({r['infer_bf16_best_slices_per_s']:.1f})",
                                 r["train_source_images_per_s"], ", ".join(map(str, r["load_after"]))]
                                for r in th], "lrrrrl")]
        co = results.get("compile")
        if co:
            if co.get("ok"):
                lines += [f"`torch.compile` ({co['preset']}, batch {co['batch']}, {co.get('threads', '?')} "
                          "threads): compiling took "
                          f"{co['compile_s']:.0f} s; {co['eager_s'] * 1e3:.1f} ms eager vs "
                          f"{co['compiled_s'] * 1e3:.1f} ms compiled per batch (speed-up {co['speedup']:.2f}, "
                          f"max |logit diff| {co['max_abs_logit_diff']:.1e}).", ""]
            else:
                lines += [f"`torch.compile` ({co['preset']}): {co['why']}.", ""]
        lines += ["Verdicts (threshold: 5%, on the median and on the best repeat alike; \"1 thread + X\" against "
                  "\"1 thread\", the rest against the engine):", ""]
        for r in va["rows"][1:]:
            base = baseline(r)
            median_x, best_x = base["median_s"] / r["median_s"], base["best_s"] / r["best_s"]
            verdict = ("helps" if min(median_x, best_x) >= HELPS else "hurts" if max(median_x, best_x) <= 1 / HELPS
                       else "no clear effect" if 1 / HELPS < median_x < HELPS and 1 / HELPS < best_x < HELPS
                       else "unclear (median and best disagree: load)")
            against = "1 thread" if base is single else "the engine"
            lines.append(f"- {r['variant']}: {verdict} ({median_x:.2f}x median, {best_x:.2f}x best, "
                         f"against {against}).")
        lines.append("")
    if notes:
        lines += [notes.strip(), ""]
    lines += ["## GPU", ""]
    if gpu and gpu.get("partial"):
        lines += [f"`{gpu['command']}` on {gpu['machine'].get('gpu')} was stopped before it finished; what it "
                  f"measured is in its JSON ({len(gpu['rows'])} row(s), unsummarised).", ""]
    elif gpu:
        lines += [f"Measured by `{gpu['command']}` on {gpu['machine'].get('gpu')} ({gpu['date']}).", "",
                  gpu["markdown"], ""]
    else:
        lines += ["No GPU was available to this measurement. `benchmarks/bench_gpu.py` is the prepared script "
                  "for one (paper preset: throughput of both stages, inference time per 256x256x200 volume, peak "
                  "GPU memory, bf16 on and off); it is tested on the CPU in CI (`--device cpu --smoke`). On a "
                  "machine with a CUDA GPU run `make bench-gpu`, then fold its JSON (`Docs/benchmarks_gpu.json`) "
                  f"into this page without measuring the CPU again: `bench_speed.py --from-json {cpu_json} "
                  "--gpu-json Docs/benchmarks_gpu.json --out Docs/benchmarks.md`. For a GPU lent for a few "
                  "minutes, without a network: `PYTHON=python3 GPU_SESSION_SECONDS=<the command's time limit minus 60> "
                  "benchmarks/gpu_session.sh OUT` (wheels of SimpleITK and MONAI in `.whl/`; not yet run on a "
                  "GPU) runs it together with the demo on CUDA (four cohorts, one twice), the paper preset "
                  "through the command line and bf16 against fp32, in one go.", ""]
    this_page = (".venv/bin/python benchmarks/bench_speed.py" + (" --smoke" if s["smoke"] else "")
                 + f" --presets {' '.join(s['presets'])} --threads {s['threads']} --paper-slices {s['paper_slices']}"
                 + (f" --model {s['model']}" if s.get("model") else "")
                 # a smoke run is refused the published page
                 + f" --out {'/tmp/bench.md' if s['smoke'] else 'Docs/benchmarks.md'}")
    lines += ["## Reproduce", "",
              "```", f"{this_page}   # this page's settings",
              "make bench          # the defaults: torch's thread count, 200-slice paper volume",
              ".venv/bin/python benchmarks/bench_speed.py --smoke --out /tmp/bench.md   # seconds, as CI",
              "make bench-gpu      # on a CUDA machine: benchmarks/bench_gpu.py -> Docs/benchmarks_gpu.json",
              "make gpu-session    # on a CUDA machine: benchmarks/gpu_session.sh -> runs/gpu_session/", "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == COMPILE_CHILD:
        compile_child(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    if argv and argv[0] == THREADS_CHILD:
        threads_child(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]) or None)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "Docs" / "benchmarks.md"),
                   help="Markdown report (default: Docs/benchmarks.md, the published page; --smoke needs its own)")
    p.add_argument("--json", default=None, help="all measurements (default: the report's name with .json)")
    p.add_argument("--gpu-json", default=str(REPO / "Docs" / "benchmarks_gpu.json"),
                   help="bench_gpu.py output to include, if it exists")
    p.add_argument("--presets", nargs="+", default=None, choices=PRESET_NAMES,
                   help="default: cpu paper (smoke: tiny)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script in seconds")
    p.add_argument("--threads", type=count(), default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--notes", default=str(Path(__file__).with_name("NOTES.md")),
                   help="Markdown with the findings, put into the report as it is (skipped if missing)")
    p.add_argument("--model", default=None, help="a trained model file for the inference variants (default: "
                                                 "random weights of the preset)")
    p.add_argument("--paper-slices", type=count(), default=200, help="coronal slices of the paper-preset volume")
    p.add_argument("--compile-timeout", type=count(), default=600, help="seconds allowed for the torch.compile trial")
    p.add_argument("--from-json", default=None, help="re-render the report from an earlier run's JSON, measuring "
                                                     "nothing (e.g. after editing NOTES.md)")
    p.add_argument("--resume", action="store_true", help="keep the sections an interrupted run with the same "
                                                         "settings already saved in the JSON")
    p.add_argument("--skip", nargs="*", default=[], choices=("training", "rate", "volumes", "memory", "variants",
                                                              "threads", "compile"), help="sections to leave out")
    args = p.parse_args(argv)
    if Path(args.out).suffix.lower() == ".json":   # the measurements' own default path: the report would replace them
        p.error("--out is the Markdown report (the measurements go beside it as .json); give a .md path")
    if args.smoke and args.out == p.get_default("out"):
        p.error("--smoke measures tiny sizes, not the published page's: give --out (e.g. /tmp/bench.md)")
    check_output(args.out, [args.notes] + ([args.from_json] if args.from_json else []))
    if args.from_json:
        try:
            results = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        except ValueError:
            results = None
        if not (isinstance(results, dict) and isinstance(results.get("settings"), dict)):
            raise VaeudaError(f"{args.from_json}: is not a bench_speed.py record (it has no \"settings\").")
        results["rendered_from"] = args.from_json
        write_report(results, args, smoke=results["settings"]["smoke"])
        return 0
    mode = "smoke" if args.smoke else "full"
    presets = args.presets or (["tiny"] if args.smoke else ["cpu", "paper"])
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    settings = {"smoke": args.smoke, "presets": presets, "threads": threads, "paper_slices": args.paper_slices,
                "model": args.model, "train": {k: list(TRAIN[mode][k]) for k in presets},
                "rate": {k: list(RATE[mode][k]) for k in presets}}
    json_path = Path(args.json) if args.json else Path(args.out).with_suffix(".json")
    check_output(json_path, [args.out])
    if args.model:                                   # read now: its section comes after tens of minutes
        load_model(args.model)
    results: dict = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load": OrderedDict(),
                     "settings": dict(settings, command=("benchmarks/bench_speed.py " + " ".join(argv)).strip())}
    if args.resume and json_path.is_file():
        earlier = json.loads(json_path.read_text(encoding="utf-8"))
        if {k: v for k, v in earlier.get("settings", {}).items() if k != "command"} == settings:
            results = earlier
            print(f"[bench] resuming: keeping the sections already in {json_path}", file=sys.stderr)
        else:
            print(f"[bench] {json_path} was made with other settings: measuring everything", file=sys.stderr)

    def run(key: str, name: str, fn, *a) -> None:
        """Measure one section unless resumed from earlier; save the JSON after each (a long run
        that is interrupted keeps what it measured: rerun with --resume)."""
        if key in results:
            return
        results[key] = section(results, name)(fn, *a)
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")

    run("flops", "flops", lambda: OrderedDict((pr, network_flops(pr)) for pr in presets))
    if "training" not in args.skip:
        run("training", "training", measure_training, presets, mode)
    if "rate" not in args.skip:
        run("inference_rate", "inference rate", measure_inference_rate, presets, mode)
    if "volumes" not in args.skip:
        run("volumes", "volume inference", measure_volumes, presets, mode, args.paper_slices)
    variant_preset = "cpu" if "cpu" in presets else presets[0]
    if "memory" not in args.skip:
        run("memory", "memory", measure_memory, mode, variant_preset, threads)
    if "variants" not in args.skip:
        run("variants", "inference variants", measure_variants, variant_preset, mode, threads, args.model)
    if "threads" not in args.skip:
        run("threads", "threads and OpenMP", measure_threads, variant_preset, mode)
    if "compile" not in args.skip and not args.smoke:
        run("compile", "torch.compile", measure_compile, variant_preset, args.compile_timeout, threads)
    write_report(results, args, smoke=args.smoke)
    print(f"[bench] measurements in {json_path}", file=sys.stderr)
    return 0


def write_report(results: dict, args, smoke: bool) -> None:
    """The Markdown report, written whole or not at all."""
    gpu_path = Path(args.gpu_json)
    gpu = json.loads(gpu_path.read_text(encoding="utf-8")) if gpu_path.is_file() else None
    out = Path(args.out)
    notes_path = Path(args.notes)
    notes = notes_path.read_text(encoding="utf-8") if notes_path.is_file() and not smoke else ""
    with atomic_path(out) as tmp:
        cpu_json = args.from_json or args.json or str(out.with_suffix(".json"))
        tmp.write_text(report(results, gpu, notes, cpu_json), encoding="utf-8")
    print(f"[bench] wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_main(main))
