"""Training: the source stage, the one-scan adaptation stage, and the oracle fine-tune.

Which networks each loss term may update is one table, :data:`ROUTES`. Gradients are
computed per group of terms with ``torch.autograd.grad`` restricted to the group's
networks, so e.g. the target reconstruction cannot move E_Z or D_Z even though it flows
through them (the paper: "to prevent E_Z and D_Z from overfitting on small {x_T}, only E_T
and D_T are updated").
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import functools
import inspect
import json
import math
import platform
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import __version__, machine
from .augment import AugmentConfig, augment_batch, random_intensity_remap
from .choices import DEVICES, check_choice
from .data import SliceSet, load_slices
from .errors import MAX_BATCH_SIZE, MAX_ITERATIONS, VaeudaError, require_count
from .fileio import (check_model_output, checkpoint_path, file_identity, file_sha256, full_suffix, image_then_label,
                     model_output_held, refuse_repeated, require_file)
from .labels import MMWHS, N_CLASSES, Convention
from .losses import SegmentationLoss, gan_loss, kl_to_standard_normal, reconstruction
from .modelfile import check_metadata, load_model, load_networks, read_tensors, refuse_unfit_weights, save_model
from .nets import VAEUDANet, get_preset
from .progress import Reporter, null_reporter
from .volumes import DEFAULT_NORMALISATION

SOURCE_NETS = ("enc_s", "enc_z", "dec_z", "dec_s", "seg")
TARGET_NETS = ("enc_t", "dec_t")

# Loss term -> the networks it may update (Eq. 1-8; see Docs/method.md).
ROUTES: Dict[str, Tuple[str, ...]] = {
    "S_rec": SOURCE_NETS, "S_kl": SOURCE_NETS, "seg": SOURCE_NETS, "S_adv": SOURCE_NETS,
    "T_rec": TARGET_NETS, "T_kl": TARGET_NETS, "T_adv": TARGET_NETS, "T_cyc": TARGET_NETS,
    "task": ("enc_z", "seg"),
}
GENERATOR_NETS = ("enc_s", "enc_t", "enc_z", "dec_z", "dec_s", "dec_t", "seg")

# Iterations per preset and stage. At the cpu preset: source and adapt as chosen on validation
# scans (Docs/results.md; adapt again for engine 0.2's DRN-C-26: 400 on two runs on an Intel Xeon,
# then 300, which beat 400 on all six runs on four cohorts on the AMD EPYC); the oracle's
# fine-tuning gains little after 1600 iterations (engine 0.2, validation Dice on two cohorts: 80.0
# and 82.7 at 800, 85.8 and 85.4 at 1600, 87.8 and 87.0 at 3200; benchmarks/oracle_convergence.py),
# and 3200 would leave make demo too little of its 10 minutes on a slower CPU than the Intel Xeon.
DEFAULT_ITERATIONS = {
    "paper": {"source": 20000, "adapt": 10000, "finetune": 4000},
    "cpu": {"source": 700, "adapt": 300, "finetune": 1600},
    "tiny": {"source": 20, "adapt": 10, "finetune": 10},
}
DEFAULT_BATCH = {"paper": 8, "cpu": 8, "tiny": 2}
# Training defaults that differ from TrainConfig's (UNIT's) per preset. The cpu preset has a
# 10-minute budget for the whole demo, ~25x fewer iterations than the paper preset: at UNIT's
# lr 1e-4 its source model is still far from converged there (Docs/results.md), at 3e-4 it is.
PRESET_TRAINING = {"paper": {}, "cpu": {"lr": 3e-4}, "tiny": {}}
# Adaptation keeps a weight average (TrainConfig.ema_decay); at the cpu preset it also steps
# faster, since its budget is a few hundred iterations, and averages over a longer window, which
# holds the held-out Dice near its peak (all chosen on validation scans, Docs/results.md).
ADAPT_TRAINING = {"paper": {"ema_decay": 0.98}, "cpu": {"lr": 5e-4, "ema_decay": 0.995}, "tiny": {"ema_decay": 0.98}}


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (stored in the model file)."""
    lambda_rec: float = 1.0
    lambda_cyc: float = 10.0
    lambda_kl: float = 0.1
    lambda_adv: float = 1.0
    lambda_seg: float = 1.0
    lr: float = 1e-4
    betas: Tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-4
    batch_size: int = 8
    gan_mode: str = "lsgan"
    use_kl: bool = True
    use_adv: bool = True
    use_cycle: bool = True
    use_task: bool = True
    background_weight: float = 0.25       # sampling weight of slices without any structure
    class_weights: Optional[Tuple[float, ...]] = None   # CE weights; None -> from label frequencies
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    checkpoint_every: int = 200
    eval_every: int = 50                  # adaptation: how often the early-stop proxy / callback runs
    # Exponential moving average of all weights (0 = off): the saved model, the callback and early
    # stopping see the average. Averaging the iterates damps the oscillation of adversarial
    # training (Yazici et al., ICLR 2019); it changes no loss and no gradient.
    ema_decay: float = 0.0
    # Generator network name (GENERATOR_NETS) -> multiple of ``lr`` it steps at; 0 freezes it
    # (weight decay included). Empty: one learning rate for all. A diagnostic, e.g. {"enc_t": 0}
    # measures what adaptation reaches without the target encoder learning.
    lr_scale: Dict[str, float] = field(default_factory=dict)
    # Opt-in, not the paper's method: the source encoder reads a random non-linear intensity
    # remapping of each source batch (augment.random_intensity_remap, GIN) and the decoder must
    # still reconstruct the original, so E_S learns to encode anatomy whatever its contrast.
    # Used by train-source --intensity-remap; adaptation and fine-tuning do not remap.
    intensity_remap: bool = False

    def weights(self) -> Dict[str, float]:
        """Term -> lambda, with the ablation switches applied."""
        kl = self.lambda_kl if self.use_kl else 0.0
        adv = self.lambda_adv if self.use_adv else 0.0
        return {"S_rec": self.lambda_rec, "S_kl": kl, "seg": self.lambda_seg, "S_adv": adv,
                "T_rec": self.lambda_rec, "T_kl": kl, "T_adv": adv,
                "T_cyc": self.lambda_cyc if self.use_cycle else 0.0,
                "task": self.lambda_seg if self.use_task else 0.0}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["augment"] = self.augment.to_dict()
        return d


def resolve_device(device: str = "auto") -> torch.device:
    check_choice("--device", device, DEVICES)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise VaeudaError("--device cuda was asked for, but no CUDA GPU is available to PyTorch.")
    return torch.device(device)


def require_structures(data, convention: Convention) -> None:
    """Refuse labelled training slices (a SliceSet) none of which holds a structure: there would be
    nothing to learn to segment, and a model that says 'background' everywhere would come of it."""
    if not bool((data.labels > 0).any()):
        n = len(data.files)
        raise VaeudaError(f"none of the {n} label file{'' if n == 1 else 's'} holds a structure of the "
                          f"'{convention.name}' label convention in the slices the model reads; check the label "
                          f"files and their label convention.")


def class_weights_from(labels: torch.Tensor) -> Tuple[float, ...]:
    """Inverse square-root class frequency, normalised to mean 1. labels (N, S, S) uint8."""
    counts = torch.bincount(labels.reshape(-1).long(), minlength=N_CLASSES).double().clamp_min(1.0)
    w = (counts.sum() / counts).sqrt()
    w = w / w.mean()
    return tuple(round(float(v), 4) for v in w)


# ----------------------------------------------------------------------------- loss terms

def source_terms(net: VAEUDANet, xs: torch.Tensor, ys: torch.Tensor, seg_loss: SegmentationLoss,
                 gen: torch.Generator, encoder_input: Optional[torch.Tensor] = None
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Eq. 1-2 on a source batch xs (B, 3, S, S), ys (B, S, S) -> (terms, {"x_ss": for Disc, "mu_s": the posterior mean}).

    ``encoder_input`` (B, 3, S, S), if given, is what E_S reads instead of xs (an intensity
    remapping of it); the reconstruction is still scored against xs.
    """
    mu, logvar = net.posterior(xs if encoder_input is None else encoder_input, "source")
    z = net.sample(mu, logvar, gen)
    x_ss = net.decode(z, "source")
    terms = {"S_rec": reconstruction(x_ss, xs), "S_kl": kl_to_standard_normal(mu, logvar),
             "seg": seg_loss(net.seg(z).float(), ys)}
    return terms, {"x_ss": x_ss, "mu_s": mu}


def target_terms(net: VAEUDANet, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, mu_s: torch.Tensor,
                 seg_loss: SegmentationLoss, cfg: TrainConfig, gen: torch.Generator
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Eq. 4, 6, 7 on a target batch xt (B, 3, S, S), given the source batch and its posterior mean mu_s (B, C, s, s)."""
    mu_t, logvar_t = net.posterior(xt, "target")
    z_t = net.sample(mu_t, logvar_t, gen)
    x_tt = net.decode(z_t, "target")
    x_ts = net.decode(z_t, "source")
    terms = {"T_rec": reconstruction(x_tt, xt), "T_kl": kl_to_standard_normal(mu_t, logvar_t)}
    if cfg.use_cycle:
        # T -> S -> T: D_T(D_Z(E_Z(E_S(x_TS)))) against x_T (Eq. 6)
        mu_ts, _ = net.posterior(x_ts, "source")
        terms["T_cyc"] = reconstruction(net.decode(mu_ts, "target"), xt)
    if cfg.use_task:
        # x_ST = D_T(D_Z(mu_S)) is an input here: only Seg and E_Z learn from it (Eq. 7). Eq. 7 writes
        # x_ST = D_T(D_Z(E_Z(E_S(x_S)))), one image per x_S: the posterior mean, since a sample would
        # render the posterior noise as blur that real target images do not have.
        with torch.no_grad():
            x_st = net.decode(mu_s.detach(), "target")
        mu_st, logvar_st = net.posterior(x_st, "target")
        terms["task"] = seg_loss(net.seg(net.sample(mu_st, logvar_st, gen)).float(), ys)
    return terms, {"x_ts": x_ts}


def routed_backward(net: VAEUDANet, weighted: Dict[str, torch.Tensor]) -> None:
    """Accumulate into ``.grad`` the gradient of each term, restricted to the networks in ROUTES."""
    groups: "OrderedDict[Tuple[str, ...], torch.Tensor]" = OrderedDict()
    for name, value in weighted.items():
        route = ROUTES[name]
        groups[route] = value if route not in groups else groups[route] + value
    items = list(groups.items())
    for i, (route, loss) in enumerate(items):
        params = [p for m in route for p in getattr(net, m).parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=i < len(items) - 1, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g


def _mixed_precision(device: torch.device):
    """bf16 autocast on CUDA (the losses are taken in fp32); off on the CPU, where training is fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def disc_loss(net: VAEUDANet, real: torch.Tensor, fakes: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """Disc: real source images against the union of generated source-domain images (detached)."""
    loss = gan_loss(net.disc(real), True, mode)
    fake = sum(gan_loss(net.disc(f.detach()), False, mode) for f in fakes) / len(fakes)
    return loss + fake


def generator_adv_terms(net: VAEUDANet, fakes: Dict[str, torch.Tensor], mode: str) -> Dict[str, torch.Tensor]:
    """The generators' side of Eq. 3 and 5: Disc's opinion of x_SS (S_adv) and, in adaptation, of
    x_TS (T_adv), each scored against the *real* label (B, 3, S, S fakes -> scalar terms)."""
    terms = {"S_adv": gan_loss(net.disc(fakes["x_ss"]), True, mode)}
    if "x_ts" in fakes:
        terms["T_adv"] = gan_loss(net.disc(fakes["x_ts"]), True, mode)
    return terms


# ----------------------------------------------------------------------------- the loop

@dataclass
class Stage:
    """What one training run does: which data, which terms, where it writes."""
    name: str                     # "source" | "adapt" | "finetune"
    source: SliceSet              # labelled slices (source MR, or labelled target for the oracle)
    target: Optional[SliceSet]    # unlabelled target slices (adaptation only)
    iterations: int
    out: Path
    meta: dict                    # metadata written into the model file
    early_stop: Optional[int] = None
    # Called every ``eval_every`` iterations of adaptation as callback(iteration, averaged, live):
    # ``averaged`` is what the model file will hold (the weight average, or the live network when
    # none is kept), ``live`` the network the optimisers step (what the generators train against,
    # e.g. its current discriminator). A returned dict joins the history entry.
    callback: Optional[Callable[[int, VAEUDANet, VAEUDANet], Optional[dict]]] = None


def _batch(data: SliceSet, weights: torch.Tensor, b: int, gen: torch.Generator):
    idx = torch.multinomial(weights, b, replacement=True, generator=gen)
    x = data.images[idx]
    y = data.labels[idx].long() if data.labels is not None else None
    return x, y


def _generator_groups(net: VAEUDANet, cfg: TrainConfig) -> List[dict]:
    """The generators' Adam parameter groups: one at ``cfg.lr``, plus one per ``cfg.lr_scale`` entry."""
    if not isinstance(cfg.lr_scale, dict):
        raise VaeudaError(f"lr_scale must map generator network names to numbers, not {cfg.lr_scale!r}.")
    unknown = sorted(set(cfg.lr_scale) - set(GENERATOR_NETS))
    if unknown:
        raise VaeudaError(f"lr_scale names {', '.join(unknown)}; it takes generator networks only "
                          f"({', '.join(GENERATOR_NETS)}).")
    bad = [name for name, scale in cfg.lr_scale.items()
           if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and scale >= 0)]
    if bad:
        raise VaeudaError(f"lr_scale of {', '.join(bad)} must be a number of at least 0.")
    plain = [p for m in GENERATOR_NETS if m not in cfg.lr_scale for p in getattr(net, m).parameters()]
    scaled = [{"params": list(getattr(net, m).parameters()), "lr": cfg.lr * cfg.lr_scale[m]}
              for m in GENERATOR_NETS if m in cfg.lr_scale]
    return [{"params": plain}] + scaled


def _optimizers(net: VAEUDANet, cfg: TrainConfig):
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.Adam(_generator_groups(net, cfg), **kw), torch.optim.Adam(net.disc.parameters(), **kw)


def _optim_tensors(name: str, opt: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            out[f"optim.{name}.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


ADAM_STATE = {"step": (), "exp_avg": None, "exp_avg_sq": None}   # None: the parameter's shape


def _load_optim(name: str, opt: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor], resumed_at: int) -> None:
    """Restore optimiser ``name``'s Adam state from a checkpoint's ``optim.<name>.<index>.<key>`` tensors,
    after checking it is the state of these parameters (Adam would fail at its first step on a
    moment of another shape, and start afresh, without a word, on none)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state: Dict[int, dict] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, _, k = key[len(prefix):].partition(".")
            if not idx.isascii() or not idx.isdigit() or int(idx) >= len(params) or k not in ADAM_STATE:
                raise VaeudaError(f"its optimiser state holds {key}, which no parameter of this run has")
            state.setdefault(int(idx), {})[k] = value
    for idx, entry in state.items():
        for k, shape in ADAM_STATE.items():
            value = entry.get(k)
            want = tuple(params[idx].shape) if shape is None else shape
            if value is None or tuple(value.shape) != want or value.dtype != torch.float32:
                raise VaeudaError(f"its optimiser state for {prefix}{idx}.{k} is missing or not the parameter's")
    if resumed_at > 0 and not state:
        raise VaeudaError(f"it holds no state of the {name} optimiser, which iteration {resumed_at} had")
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def _weight_average(net: VAEUDANet, decay: float):
    """An EMA copy of ``net`` (parameters and buffers), or None when ``decay`` is 0."""
    if not decay:
        return None
    if not 0.0 < decay < 1.0:
        raise VaeudaError(f"ema_decay must be 0 (off) or between 0 and 1, not {decay}.")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _update_weight_average(ema, net: VAEUDANet) -> None:
    """One EMA step; whole-number buffers (BatchNorm's num_batches_tracked) are counts, not weights:
    averaged and truncated they would stay at their first value, so they follow the live network."""
    ema.update_parameters(net)
    for averaged, live in zip(ema.module.buffers(), net.buffers()):
        if not averaged.is_floating_point():
            averaged.copy_(live)


PROXY_MAX_SLICES = 64   # the early-stop proxy reads at most this many target slices, evenly spaced
# What early stopping watches, by name: records of early-stopped runs keep it (Table 1 reuses a
# model only when it matches), so a run stopped by an earlier proxy is not taken for this one's.
EARLY_STOP_PROXY = f"target_cycle_l1: mean |x_TST - x_T| over <= {PROXY_MAX_SLICES} target slices, posterior means"


def proxy_slices(images: torch.Tensor) -> torch.Tensor:
    """The target slices (N, 3, S, S) the early-stop proxy reads: all of them, or
    ``PROXY_MAX_SLICES`` evenly spaced ones (first and last included) when there are more."""
    if len(images) <= PROXY_MAX_SLICES:
        return images
    return images[torch.linspace(0, len(images) - 1, PROXY_MAX_SLICES).round().long()]


@torch.no_grad()
def target_proxy(net: VAEUDANet, images: torch.Tensor, use_cycle: bool, device: torch.device,
                 batch_size: int = 16) -> float:
    """Early stopping's unsupervised proxy (lower is better): the mean T->S->T cycle error
    |x_TST - x_T| over the target slices ``images`` (N, 3, S, S), or the reconstruction error
    |x_TT - x_T| when the cycle term is off.

    Every image is encoded to its posterior mean, not a sample, and read as it is, not augmented:
    the same weights always give the same number, so the proxy moves only when the model does.
    (One augmented training batch's sampled loss, the earlier proxy, moved more between
    evaluations than the model did and did not track held-out Dice; Docs/results.md, "Which
    signal tells when to stop".) ``net``'s training mode is restored on return."""
    was_training = net.training
    net.eval()
    total = 0.0
    for start in range(0, len(images), batch_size):
        x_t = images[start:start + batch_size].to(device)
        mu_t, _ = net.posterior(x_t, "target")
        if use_cycle:
            mu_ts, _ = net.posterior(net.decode(mu_t, "source"), "source")
            x_back = net.decode(mu_ts, "target")
        else:
            x_back = net.decode(mu_t, "target")
        total += float((x_back.float() - x_t).abs().mean()) * len(x_t)
    net.train(was_training)
    return total / len(images)


@dataclass
class EarlyStopState:
    """Early stopping's memory: kept in checkpoints, so that a resumed run stops where an
    uninterrupted one would and keeps the same weights."""
    bad_evals: int = 0                      # evaluations since the proxy last improved
    best_proxy: Optional[float] = None
    best_iteration: Optional[int] = None
    best_weights: Optional[dict] = None     # the state_dict of the network the file would hold then

    def header(self) -> dict:
        """The checkpoint's ``train_state["early_stop"]``: every field but the weights (kept as tensors)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "best_weights"}

    @classmethod
    def restored(cls, header: dict, best_weights: Optional[dict]) -> "EarlyStopState":
        """The state :meth:`header` and the checkpoint's ``best.*`` tensors describe. A header with
        ``proxy_ema`` was written by an earlier engine, whose proxy was one batch's cycle loss: its
        best value is not comparable with :func:`target_proxy`'s, and its history's ``proxy``
        readings would sit beside this engine's unmarked, so it is refused (with or without
        early stopping)."""
        if "proxy_ema" in header:
            raise VaeudaError("its proxy readings are an earlier engine's (one batch's cycle loss), which this "
                              "engine's cannot continue; remove the checkpoint to start afresh, "
                              "or resume with the engine that made it.")
        return cls(**{name: header[name] for name in cls().header() if name in header},
                   best_weights=best_weights or None)


def save_checkpoint(path: Path, net, opts, gen: torch.Generator, iteration: int, history: list, meta: dict,
                    ema=None, early: Optional[EarlyStopState] = None, run: Optional[str] = None) -> None:
    """``run``: the token of the run writing it (:func:`checkpoint_run`), so that the run's end
    removes its own checkpoint and never another's."""
    extra = {"rng.gen": gen.get_state()}
    if ema is not None:
        extra.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    extra.update(_optim_tensors("gen", opts[0]))
    extra.update(_optim_tensors("disc", opts[1]))
    state = {"iteration": iteration, "history": history, "run": run}
    if early is not None:
        state["early_stop"] = early.header()
        extra.update({f"best.{k}": v for k, v in (early.best_weights or {}).items()})   # --early-stop only
    save_model(path, net, meta, extra_tensors=extra, extra_header={"train_state": json.dumps(state)})


def checkpoint_run(path: Path) -> Optional[str]:
    """The token of the run that wrote the checkpoint at ``path`` (read from its header alone);
    None when there is none, or no checkpoint of ours there."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {})["train_state"]).get("run")
    except Exception:           # missing, foreign or damaged (any of safetensors' and json's errors): not ours
        return None


def _kept(good_checkpoint: Optional[Path]) -> str:
    return (f"the last good checkpoint is kept at {good_checkpoint}" if good_checkpoint
            else "no checkpoint had been written yet")


def _refuse_non_finite_weights(net: VAEUDANet, when: str, good_checkpoint: Optional[Path]) -> None:
    """A finite loss can still step weights to infinity (an infinite gradient): never save those."""
    bad = [name for name in VAEUDANet.MODULES
           if not all(bool(torch.isfinite(p).all()) for p in getattr(net, name).parameters())]
    if bad:
        raise VaeudaError(f"training diverged: weights of {', '.join(bad)} became NaN or infinite {when}; "
                          f"{_kept(good_checkpoint)}.")


# Provenance entries that name a run's inputs (the stages record those that apply to them).
RUN_INPUTS = ("source_model", "source_data", "source_labels", "target_data", "slices", "finetune_data",
              "finetune_labels")
# ... and those that record the inputs' contents: SHA-256 digests (null for a file whose voxels lie elsewhere).
RUN_INPUT_DIGESTS = ("source_model_sha256", "source_sha256", "target_sha256", "finetune_sha256")


def _refuse_other_settings(ckpt: Path, then: dict, now: dict, done: int, iterations: int) -> None:
    """Refuse to resume a checkpoint whose run differs from this one in what decides its steps.

    ``then`` is the checkpoint's metadata, ``now`` this run's. Resumed with another seed, other
    training options or other inputs, a run would be neither the interrupted one nor the one
    asked for, while its model file recorded the latter. More iterations than the checkpoint's
    run asked for continue it as an uninterrupted longer run would; fewer than it has done cannot.
    """
    def as_stored(value):    # the checkpoint's metadata went through JSON (tuples are lists there)
        return json.loads(json.dumps(value))

    then_prov, now_prov = then.get("provenance", {}), now["provenance"]
    other_inputs = ({k: then_prov.get(k) for k in RUN_INPUTS} != as_stored({k: now_prov.get(k) for k in RUN_INPUTS}))
    # the same paths with other contents (a cohort made again there, a source model trained again);
    # checkpoints of older engines record none
    other_inputs |= any(None not in (then_prov.get(k), now_prov.get(k)) and then_prov.get(k) != now_prov.get(k)
                        for k in RUN_INPUT_DIGESTS)
    differs = [what for what, differ in (
        (f"a different --seed ({then_prov.get('seed')})", then_prov.get("seed") != now_prov.get("seed")),
        # patience decides where the run stops and which weights it keeps
        (f"a different --early-stop ({then_prov.get('early_stop') or 'none'})",
         then_prov.get("early_stop") != now_prov.get("early_stop")),
        # a GPU computes in bf16 autocast, a CPU in float32: half of each is neither run
        ("another --device", then_prov.get("device") != now_prov.get("device")),
        ("different input volumes or source model", other_inputs),
        # other inputs give other class weights, an option: then the inputs are the difference to name
        ("different training options", not other_inputs and then.get("train") != as_stored(now["train"])),
    ) if differ]
    if differs:
        raise VaeudaError(f"{ckpt}: checkpoint was made with {' and '.join(differs)} from this run; "
                          f"resume with the interrupted run's settings, or remove it to start afresh.")
    if done > iterations:
        raise VaeudaError(f"{ckpt}: checkpoint has done {done} iterations, more than the {iterations} asked for; "
                          f"resume with --iterations {done} or more, or remove it to start afresh.")


def run_stage(net: VAEUDANet, stage: Stage, cfg: TrainConfig, device: torch.device, seed: int,
              resume: bool = False, reporter: Optional[Reporter] = None) -> dict:
    """Train ``net`` for one stage, checkpointing as it goes, and write the model file ``stage.out``.

    Returns the metadata written. Raises VaeudaError (keeping the last good checkpoint) if a
    loss becomes NaN or infinite.
    """
    reporter = reporter or null_reporter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net.to(device).train()
    opts = _optimizers(net, cfg)
    history: List[dict] = []
    start = 0
    ema = _weight_average(net, cfg.ema_decay)
    model = net if ema is None else ema.module   # what the callback, early stopping and the saved file see
    ckpt = checkpoint_path(stage.out)
    early = EarlyStopState()
    resumed = resume and ckpt.exists()
    # The checkpoint the end removes: the one resumed, then each this run writes; told apart from
    # another run's (one with the same --out, started meanwhile) by the token in its header ("" for
    # one an engine before the tokens wrote).
    run_token, own_checkpoint = uuid.uuid4().hex, (checkpoint_run(ckpt) or "") if resumed else None
    if resumed:
        tensors, meta, header = read_tensors(ckpt, what="training checkpoint")
        check_metadata(ckpt, meta)
        try:
            state = json.loads(header["train_state"])
            start, history = state["iteration"], state["history"]
            rng_state = tensors["rng.gen"]
            if (isinstance(start, bool) or not isinstance(start, int) or start < 0 or not isinstance(history, list)
                    or not all(isinstance(entry, dict) for entry in history)):
                raise ValueError
        except (KeyError, TypeError, ValueError, RecursionError):
            raise VaeudaError(f"{ckpt}: not a training checkpoint (its training state is missing or damaged); "
                              f"remove it to start afresh.") from None
        if meta.get("stage") != stage.meta.get("stage"):
            raise VaeudaError(f"{ckpt}: checkpoint is of the '{meta.get('stage')}' stage, not '{stage.meta.get('stage')}'.")
        if meta.get("config") != net.cfg.to_dict():
            raise VaeudaError(f"{ckpt}: checkpoint was made with a different network configuration "
                              f"(preset or input size) than this run.")
        # Switches a run must keep: half of each would reproduce nowhere (--portable), or be
        # another method (--intensity-remap). Flag -> (as recorded, as now).
        switches = {"--portable": (meta.get("provenance", {}).get("numerics", {}).get("portable", False),
                                   machine.portable()),
                    "--intensity-remap": (meta.get("train", {}).get("intensity_remap", False), cfg.intensity_remap)}
        for flag, (then, now) in switches.items():
            if then != now:
                how = "with" if then else "without"
                raise VaeudaError(f"{ckpt}: checkpoint was made {how} {flag}; resume it {how} {flag} too.")
        _refuse_other_settings(ckpt, meta, stage.meta, start, stage.iterations)
        load_networks(net, tensors, ckpt)
        net.to(device)
        try:
            _load_optim("gen", opts[0], tensors, start)
            _load_optim("disc", opts[1], tensors, start)
            gen.set_state(rng_state)
        except VaeudaError as exc:
            raise VaeudaError(f"{ckpt}: checkpoint is damaged ({exc}); remove it to start afresh.") from None
        except (RuntimeError, TypeError):      # torch's refusal of a generator state of another size or type
            raise VaeudaError(f"{ckpt}: checkpoint is damaged (its random generator state is not one); remove it "
                              f"to start afresh.") from None
        if ema is not None:
            ema_state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
            if not ema_state:
                raise VaeudaError(f"{ckpt}: checkpoint has no weight average, but this run keeps one (ema_decay).")
            try:
                refuse_unfit_weights({k: v for k, v in ema_state.items() if k.startswith("module.")},
                                      {k: v for k, v in ema.state_dict().items() if k.startswith("module.")})
                ema.load_state_dict(ema_state)
            except (VaeudaError, RuntimeError) as exc:
                raise VaeudaError(f"{ckpt}: checkpoint is damaged (its weight average: "
                                  f"{str(exc).splitlines()[0].rstrip('.')}); remove it to start afresh.") from None
        if isinstance(state.get("early_stop"), dict):
            best_weights = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
            try:
                early = EarlyStopState.restored(state["early_stop"], best_weights)
            except VaeudaError as exc:
                raise VaeudaError(f"{ckpt}: {exc}") from None
        reporter.log(f"resuming {stage.name} from iteration {start} ({ckpt})")

    seg_loss = SegmentationLoss(cfg.class_weights).to(device)
    weights = cfg.weights()
    src_w = stage.source.sampling_weights(cfg.background_weight)
    tgt_w = stage.target.sampling_weights() if stage.target is not None else None
    proxy_images = proxy_slices(stage.target.images) if stage.target is not None else None
    # a checkpoint this run did not write or resume from (another run's) is not its last good one
    good_checkpoint = ckpt if resumed else None

    reporter.stage(stage.name, stage.iterations, start=start)
    reporter.step(start)
    it = start
    for it in range(start + 1, stage.iterations + 1):
        xs, ys = _batch(stage.source, src_w, cfg.batch_size, gen)
        xs, ys = augment_batch(xs, ys, cfg.augment, gen)
        xs, ys = xs.to(device, non_blocking=True), ys.to(device, non_blocking=True)
        xt = None
        if stage.target is not None:
            xt, _ = _batch(stage.target, tgt_w, cfg.batch_size, gen)
            xt, _ = augment_batch(xt, None, cfg.augment, gen)
            xt = xt.to(device, non_blocking=True)

        remapped = random_intensity_remap(xs, gen) if cfg.intensity_remap else None

        with _mixed_precision(device):
            terms, fakes = source_terms(net, xs, ys, seg_loss, gen, remapped)
            mu_s = fakes.pop("mu_s")
            if xt is not None:
                t_terms, t_fakes = target_terms(net, xs, ys, xt, mu_s, seg_loss, cfg, gen)
                terms.update(t_terms)
                fakes.update(t_fakes)
        if cfg.use_adv:
            # Disc first (on detached fakes), then its fresh opinion of the fakes for the generators.
            # Each in its own autocast region: a region keeps the bf16 copies of the weights it has
            # cast until it ends, so in one region the generators would meet the Disc of before its step.
            with _mixed_precision(device):
                d_loss = disc_loss(net, xs, list(fakes.values()), cfg.gan_mode)
            opts[1].zero_grad(set_to_none=True)
            d_loss.float().backward()
            opts[1].step()
            with _mixed_precision(device):
                terms.update(generator_adv_terms(net, fakes, cfg.gan_mode))

        weighted = {k: weights[k] * v.float() for k, v in terms.items() if weights[k] > 0}
        total = sum(weighted.values())
        if not torch.isfinite(total):
            bad = [k for k, v in terms.items() if not torch.isfinite(v)]
            raise VaeudaError(f"training diverged: loss {', '.join(bad) or 'total'} became NaN or infinite at "
                              f"iteration {it} of the {stage.name} stage; {_kept(good_checkpoint)}.")
        opts[0].zero_grad(set_to_none=True)
        routed_backward(net, weighted)
        opts[0].step()
        if ema is not None:
            _update_weight_average(ema, net)

        record = {k: round(float(v.detach()), 5) for k, v in terms.items()}
        if it % 10 == 0 or it == stage.iterations:
            reporter.step(it, loss=float(total.detach()), **{k: record[k] for k in ("seg", "task") if k in record})
        # early stopping also scores the last iteration, so that every iteration it may keep was scored
        if stage.target is not None and (it % cfg.eval_every == 0 or (stage.early_stop and it == stage.iterations)):
            proxy = target_proxy(model, proxy_images, cfg.use_cycle, device)
            # a non-finite reading (finite weights can still decode to inf) is never the best one,
            # and is recorded as null: the history is JSON
            finite = math.isfinite(proxy)
            entry = {"iteration": it, "proxy": round(proxy, 5) if finite else None, **record}
            if stage.callback is not None:
                extra = stage.callback(it, model, net)
                net.train()
                if extra:
                    entry.update(extra)
            history.append(entry)
            if stage.early_stop:
                if finite and (early.best_proxy is None or proxy < early.best_proxy):
                    early.best_proxy, early.best_iteration, early.bad_evals = proxy, it, 0
                    early.best_weights = copy.deepcopy(model.state_dict())
                else:
                    early.bad_evals += 1
                    if early.bad_evals >= stage.early_stop:
                        proxy_name = "cycle-consistency" if cfg.use_cycle else "target reconstruction"
                        reporter.log(f"early stop at iteration {it}: the {proxy_name} proxy has not improved "
                                     f"for {early.bad_evals} evaluations; keeping iteration {early.best_iteration}")
                        break
        if it % cfg.checkpoint_every == 0 and it < stage.iterations:
            _refuse_non_finite_weights(net, f"by iteration {it} of the {stage.name} stage", good_checkpoint)
            save_checkpoint(ckpt, net, opts, gen, it, history, stage.meta, ema, early, run=run_token)
            good_checkpoint, own_checkpoint = ckpt, run_token
    reporter.close()

    if model is not net:
        net.load_state_dict(model.state_dict())
    if early.best_weights is not None and stage.early_stop:
        net.load_state_dict(early.best_weights)
        stage.meta["provenance"]["early_stopped_at"] = early.best_iteration
    stage.meta["provenance"]["iterations_done"] = it
    stage.meta["history"] = history
    _refuse_non_finite_weights(net, f"by the end of the {stage.name} stage", good_checkpoint)   # what would be saved
    net.eval()
    save_model(stage.out, net, stage.meta)
    if own_checkpoint is not None and (checkpoint_run(ckpt) or "") == own_checkpoint:   # never another run's
        ckpt.unlink(missing_ok=True)
    return stage.meta


# ----------------------------------------------------------------------------- public stages

def _base_meta(stage: str, preset: str, convention: Convention, normalisation: dict, cfg: TrainConfig,
               seed: int, device: torch.device, provenance: dict) -> dict:
    return {
        "stage": stage, "preset": preset,
        "labels": {"convention": convention.to_dict()},
        "normalisation": normalisation, "train": cfg.to_dict(),
        "has_target_encoder": stage == "adapted",
        "provenance": {"seed": seed, "device": str(device), "torch": torch.__version__,
                       "engine": __version__, "host": platform.node(),
                       # what decides the rounding on a CPU: the same seed elsewhere is another model
                       "numerics": machine.numerics(),
                       "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **provenance},
    }


def _check_batch_size(batch_size) -> None:
    require_count("--batch-size", batch_size)
    if batch_size > MAX_BATCH_SIZE:
        raise VaeudaError(f"--batch-size {batch_size} is more than {MAX_BATCH_SIZE} slices per step, which would "
                          f"only exhaust memory; the presets use at most {max(DEFAULT_BATCH.values())}.")


def resolve_train_config(overrides: Optional[dict], batch_size: Optional[int], preset: str,
                         stage_defaults: Optional[dict] = None) -> TrainConfig:
    """The options a run uses: TrainConfig's defaults, then the preset's, the stage's and ``overrides``.

    ``batch_size`` None means the preset's. An option TrainConfig does not have is refused.
    """
    cfg = TrainConfig(batch_size=DEFAULT_BATCH.get(preset, 8) if batch_size is None else batch_size)
    for k, v in {**PRESET_TRAINING.get(preset, {}), **(stage_defaults or {}), **(overrides or {})}.items():
        if not hasattr(cfg, k):
            raise VaeudaError(f"unknown training option '{k}'.")
        setattr(cfg, k, v)
    _check_batch_size(cfg.batch_size)   # overrides may set it too
    return cfg


def _stage_iterations(iterations: Optional[int], preset: str, stage: str) -> int:
    """The stage's iteration count: the preset's default when None (0 is not None: the stages refuse
    counts below 1 up front, with :func:`_check_run_arguments`)."""
    return DEFAULT_ITERATIONS[preset][stage] if iterations is None else iterations


def _check_run_arguments(iterations, batch_size, early_stop=None) -> None:
    """Refuse bad counts before any data is read."""
    if iterations is not None:
        require_count("--iterations", iterations, maximum=MAX_ITERATIONS)
    if early_stop is not None:
        require_count("--early-stop", early_stop)
    if batch_size is not None:
        _check_batch_size(batch_size)


def _check_output(out, inputs: Sequence, resume: bool, reporter: Reporter) -> None:
    """check_model_output, then the notes on ``out`` (once it is known good: a refused one says one
    thing), before the volumes are read."""
    check_model_output(out, inputs)
    if resume and not checkpoint_path(out).exists():     # a mistyped --out?
        reporter.log(f"note: no checkpoint at {checkpoint_path(out)} to resume; training from the first iteration")
    if not str(out).lower().endswith(".safetensors"):
        reporter.log(f"note: {out} is written as a safetensors model file; the Slicer module's file dialogs list "
                     f"only names ending in .safetensors")


def _refuse_labelled_targets(targets: Sequence[Path], pairs: Sequence[Tuple[Path, Path]]) -> None:
    """A target volume that is also a labelled source volume (e.g. ``--source-data`` a folder that
    holds it) would teach the adaptation its labels: no longer unsupervised, and its score a lie."""
    labelled = {file_identity(image) for image, _ in pairs}
    for target in targets:
        if file_identity(target) in labelled:
            raise VaeudaError(f"{target}: is also one of the labelled source volumes, so adapting would train on "
                              f"its labels; give source volumes without it (--source-data).")


def _holding_its_output(training: Callable) -> Callable:
    """A training function that holds its model file ``out`` while it runs
    (:func:`fileio.model_output_held`): another run writing the same file, called from Python or
    from the command line, is refused meanwhile (each would remove or resume the other's checkpoint)."""
    signature = inspect.signature(training)

    @functools.wraps(training)
    def holding(*args, **kwargs):
        with model_output_held(signature.bind(*args, **kwargs).arguments["out"]):
            return training(*args, **kwargs)
    return holding


def _inherited_options(src_meta: dict) -> dict:
    """Training options that belong to the source model's networks rather than to the stage: the
    discriminator keeps the loss it was trained with (LSGAN scores or vanilla-GAN logits)."""
    return {"gan_mode": src_meta["train"].get("gan_mode", "lsgan")}


@_holding_its_output
def train_source(images: Sequence[Path], labels: Sequence[Path], out, preset: Optional[str] = None,
                 iterations: Optional[int] = None, batch_size: Optional[int] = None, seed: int = 0,
                 device: str = "auto", convention: Convention = MMWHS, normalisation: Optional[dict] = None,
                 resume: bool = False, reporter: Optional[Reporter] = None, overrides: Optional[dict] = None,
                 input_size: Optional[int] = None, intensity_remap: bool = False) -> dict:
    """Source stage: E_S, E_Z, D_Z, D_S, Seg minimise L^S_vae + L_seg + L^S_adv; Disc learns x_S vs x_SS.

    ``input_size`` replaces the preset's slice size S (the same 192 mm field of view, sampled
    finer or coarser; widths and depths stay the preset's). Every later stage and ``segment``
    take it from the model file. ``intensity_remap`` (opt-in, not the paper's method): E_S reads
    randomly remapped intensities (:func:`augment.random_intensity_remap`), see TrainConfig.
    """
    reporter = reporter or null_reporter()
    _check_run_arguments(iterations, batch_size)
    _check_output(out, list(images) + list(labels), resume, reporter)
    dev = resolve_device(device)
    if preset is None:
        preset = "paper" if dev.type == "cuda" else "cpu"
        reporter.log(f"no --preset given: using '{preset}' ({'CUDA GPU found' if dev.type == 'cuda' else 'no CUDA GPU'})")
    net_cfg = get_preset(preset)
    if input_size is not None:           # VAEUDANet checks it fits the networks
        net_cfg = dataclasses.replace(net_cfg, input_size=input_size)
    normalisation = normalisation or dict(DEFAULT_NORMALISATION)
    torch.manual_seed(seed)
    net = VAEUDANet(net_cfg)
    net_cfg.check()                      # and the range loading will check: a model it can read back
    reporter.log(f"reading {len(images)} labelled source volume(s)")
    files = image_then_label(images, labels)
    digests = _digests(files)
    data = load_slices(images, net_cfg.input_size, net_cfg.slice_fov_mm, normalisation, labels, convention)
    _require_unchanged(files, digests)
    require_structures(data, convention)
    cfg = resolve_train_config(overrides, batch_size, preset)
    cfg.intensity_remap = cfg.intensity_remap or intensity_remap
    if cfg.class_weights is None:
        cfg.class_weights = class_weights_from(data.labels)
    iters = _stage_iterations(iterations, preset, "source")
    meta = _base_meta("source", preset, convention, normalisation, cfg, seed, dev,
                      {"source_data": [str(Path(p).resolve()) for p in images],
                       "source_labels": [str(Path(p).resolve()) for p in labels],
                       "source_sha256": digests,
                       "iterations": iters})
    stage = Stage("source", data, None, iters, Path(out), meta)
    return run_stage(net, stage, cfg, dev, seed, resume, reporter)


def _digests(paths: Sequence) -> List[Optional[str]]:
    """:func:`volume_sha256` of each input, taken before it is read."""
    return [volume_sha256(p) for p in paths]


def _require_unchanged(paths: Sequence, before: Sequence[Optional[str]]) -> None:
    """Refuse an input whose bytes changed while the run read it (a copy still being written, a
    cohort made again): the model would record the digest of other data than it learnt from."""
    for path, then in zip(paths, before):
        if then is not None and volume_sha256(path) != then:
            raise VaeudaError(f"{path}: changed while it was being read; run again once nothing is writing it.")


def volume_sha256(path) -> Optional[str]:
    """The SHA-256 of a volume file that holds its voxels itself; None for a DICOM folder or a header
    whose voxels lie in another file (.mhd, .nhdr), whose changes it would not see."""
    path = Path(path)
    if not path.is_file() or full_suffix(path).lower() in (".mhd", ".nhdr"):
        return None
    try:
        return file_sha256(path)
    except OSError as exc:
        raise VaeudaError(f"{path}: cannot be read ({exc.strerror or exc}).") from None


def _source_pairs(meta: dict, model_path, source_data: Optional[Sequence[str]], reporter: Reporter):
    """The labelled source volumes an adaptation trains on -> ``([(image, label), ...], digests)``:
    ``source_data`` if given, else those the source model records; ``digests`` as
    ``provenance.source_sha256`` has them, of the files as they are now."""
    from .data import find_pairs
    if source_data:
        pairs = find_pairs(source_data, labels_option=False)   # (a cohort folder given whole is refused)
        files = image_then_label([image for image, _ in pairs], [label for _, label in pairs])
        return pairs, [volume_sha256(p) for p in files]
    prov = meta.get("provenance", {})
    images, labels = prov.get("source_data"), prov.get("source_labels")
    if not images:
        raise VaeudaError(f"{model_path}: records no labelled source volumes; pass them with --source-data.")
    missing = [p for p in images + labels if not Path(p).exists()]
    if missing:
        raise VaeudaError(f"{model_path}: {len(missing)} of the {len(images) + len(labels)} labelled source files it "
                          f"was trained on are not at their recorded paths (the first: {missing[0]}); pass the "
                          f"volumes with --source-data.")
    files = image_then_label(images, labels)
    digests = [volume_sha256(p) for p in files]
    recorded = prov.get("source_sha256")      # models of engines before it record none
    if isinstance(recorded, list) and len(recorded) == len(files):
        changed = [p for p, then, now in zip(files, recorded, digests) if then is not None and now != then]
        if changed:   # e.g. a cohort made again in that folder: the model's own MR scans are gone
            reporter.log(f"note: {len(changed)} of the {len(files)} labelled source files {model_path} was trained on "
                         f"have changed since (the first: {changed[0]}); adapting trains on them as they are now")
    return [(Path(i), Path(l)) for i, l in zip(images, labels)], digests


@_holding_its_output
def adapt(source_model, targets: Sequence[Path], out, iterations: Optional[int] = None, seed: int = 0,
          device: str = "auto", use_kl: bool = True, use_adv: bool = True, use_cycle: bool = True,
          use_task: bool = True, slice_range: Optional[Tuple[int, int]] = None, early_stop: Optional[int] = None,
          source_data: Optional[Sequence[str]] = None, batch_size: Optional[int] = None, resume: bool = False,
          reporter: Optional[Reporter] = None, callback=None, overrides: Optional[dict] = None) -> dict:
    """Adaptation stage (Eq. 8) on unlabelled target volumes, usually one."""
    reporter = reporter or null_reporter()
    _check_run_arguments(iterations, batch_size, early_stop)
    refuse_repeated(targets, "target volume")   # it would count twice in the adaptation's sampling, unasked
    dev = resolve_device(device)
    model_digest = file_sha256(require_file(source_model, "model file"))    # (before it is read)
    net, src_meta = load_model(source_model)
    preset = src_meta["preset"]
    convention = Convention.from_dict(src_meta["labels"]["convention"])
    normalisation = src_meta["normalisation"]
    size, fov = net.cfg.input_size, net.cfg.slice_fov_mm
    pairs, source_digests = _source_pairs(src_meta, source_model, source_data, reporter)
    _refuse_labelled_targets(targets, pairs)
    _check_output(out, [source_model, *targets, *(p for pair in pairs for p in pair)], resume, reporter)
    reporter.log(f"reading {len(targets)} target volume(s) and {len(pairs)} labelled source volume(s)")
    # the target first: a wrong one (a label map, too few slices) is refused before the source is read
    target_digests = _digests(targets)
    target = load_slices(list(targets), size, fov, normalisation, slice_range=slice_range)
    if src_meta.get("stage") != "source":   # said once the target is known good: a wrong one is refused alone
        reporter.log(f"note: {source_model} is not a source model (its stage: '{src_meta.get('stage')}'); adapting "
                     f"it anyway: E_T and D_T start again as copies of its E_S and D_S, so an earlier adaptation is "
                     f"not continued")
    source = load_slices([p[0] for p in pairs], size, fov, normalisation, [p[1] for p in pairs], convention)
    _require_unchanged([source_model, *targets, *image_then_label([p[0] for p in pairs], [p[1] for p in pairs])],
                       [model_digest, *target_digests, *source_digests])
    require_structures(source, convention)   # task consistency trains Seg on their labels
    stage_defaults = {**ADAPT_TRAINING.get(preset, {}), **_inherited_options(src_meta)}
    cfg = resolve_train_config(overrides, batch_size, preset, stage_defaults)
    cfg.use_kl, cfg.use_adv, cfg.use_cycle, cfg.use_task = use_kl, use_adv, use_cycle, use_task
    cfg.class_weights = tuple(src_meta["train"].get("class_weights") or class_weights_from(source.labels))
    net.copy_source_to_target()
    iters = _stage_iterations(iterations, preset, "adapt")
    meta = _base_meta("adapted", preset, convention, normalisation, cfg, seed, dev,
                      {"source_model": str(Path(source_model).resolve()),
                       "source_model_sha256": model_digest,
                       "source_data": [str(p[0].resolve()) for p in pairs],
                       "source_labels": [str(p[1].resolve()) for p in pairs],
                       "source_sha256": source_digests,
                       "target_data": [str(Path(t).resolve()) for t in targets],
                       "target_sha256": target_digests,
                       "slices": list(slice_range) if slice_range else None,
                       "iterations": iters, "early_stop": early_stop,
                       "source_provenance": src_meta.get("provenance")})
    stage = Stage("adapt", source, target, iters, Path(out), meta, early_stop=early_stop, callback=callback)
    return run_stage(net, stage, cfg, dev, seed, resume, reporter)


@_holding_its_output
def finetune(source_model, images: Sequence[Path], labels: Sequence[Path], out, iterations: Optional[int] = None,
             seed: int = 0, device: str = "auto", batch_size: Optional[int] = None, resume: bool = False,
             reporter: Optional[Reporter] = None) -> dict:
    """The oracle: supervised fine-tuning of the source model on labelled target volumes.

    The source path (E_S, E_Z, D_Z, D_S, Seg, with Disc) continues training with the target
    images and labels, so the result segments with the source encoder.
    """
    reporter = reporter or null_reporter()
    _check_run_arguments(iterations, batch_size)
    _check_output(out, [source_model, *images, *labels], resume, reporter)
    dev = resolve_device(device)
    model_digest = file_sha256(require_file(source_model, "model file"))    # (before it is read)
    net, src_meta = load_model(source_model)
    if src_meta.get("stage") != "source":
        reporter.log(f"note: {source_model} is not a source model (its stage: '{src_meta.get('stage')}'); "
                     f"fine-tuning its source path (E_S, E_Z, D_Z, D_S, Seg) anyway: the result segments with the "
                     f"source encoder")
    preset = src_meta["preset"]
    convention = Convention.from_dict(src_meta["labels"]["convention"])
    normalisation = src_meta["normalisation"]
    files = image_then_label(images, labels)
    digests = _digests(files)
    data = load_slices(images, net.cfg.input_size, net.cfg.slice_fov_mm, normalisation, labels, convention)
    _require_unchanged([source_model, *files], [model_digest, *digests])
    require_structures(data, convention)
    cfg = resolve_train_config(None, batch_size, preset, _inherited_options(src_meta))
    cfg.class_weights = tuple(src_meta["train"].get("class_weights") or class_weights_from(data.labels))
    iters = _stage_iterations(iterations, preset, "finetune")
    meta = _base_meta("finetuned", preset, convention, normalisation, cfg, seed, dev,
                      {"source_model": str(Path(source_model).resolve()),
                       "source_model_sha256": model_digest,
                       "finetune_data": [str(Path(p).resolve()) for p in images],
                       "finetune_labels": [str(Path(p).resolve()) for p in labels],
                       "finetune_sha256": digests,
                       "iterations": iters})
    stage = Stage("finetune", data, None, iters, Path(out), meta)
    return run_stage(net, stage, cfg, dev, seed, resume, reporter)
