"""Adaptation curves: held-out Dice and the discriminator's scores every few iterations of `adapt`.

    python benchmarks/adaptation_curves.py --model demo_out/models/source.safetensors \\
        --cohort demo_out/cohort --target ct_1013 --out curves.json [--no-task-consistency ...]

Adapts a source model on one target scan with the engine's own ``train.adapt`` (defaults of the
model's preset, or the ablation switches given) and, before it starts (iteration 0: the source
model) and every ``--every`` iterations, records:

- ``val``: mean Dice [%] on validation scans, by default (at most 4 of) the CT training-pool scans
  other than the adaptation scan (their labels play no part in adaptation). Choose settings on these.
- ``test``: mean Dice [%] on the cohort's CT test split, for the record only.
- ``disc``: the discriminator's mean score (over patches and scales; real -> 1, fake -> 0)
  on fixed slices of real MR (x_S), their reconstruction (x_SS), the adaptation scan rendered as
  MR (x_TS) and the raw adaptation scan (x_T). Dice is that of the weight average the saved model
  keeps; the scores are of the live discriminator and generators, which is what the generators
  train against.
- ``contrast`` (with ``--contrast``): the LV border contrast (``vaeuda.diagnose``, blood - myocardium
  and ring - myocardium) of x_ST and x_TS as the weight average renders them, on labelled slices
  of two MR training scans and of the validation scans: whether the translations flip the
  border's polarity as adaptation goes on (real CT about 0.4 / -0.1, real MR 1.4 / 1.3).
- ``proxies`` (with ``--proxies``): label-free model-selection signals on the adaptation scan's
  own slices (:func:`selection_proxies`), to see which of them tracks held-out Dice; the engine's
  early-stop proxy (``train.target_proxy`` on ``train.proxy_slices``; before the nineteenth
  session the moving average of one batch's cycle loss) is added as ``engine_proxy`` from the
  run's history.
  ``benchmarks/proxy_study.py`` scores them. ``--slices A:B`` adapts on those slices only (the
  few-shot setting), and the proxies read those slices.
- ``latent`` (with ``--latent-probe``): how well a fresh domain classifier tells the target
  encoding from the source encoding (:func:`latent_probe`): trained on the posterior means of two
  MR training scans (E_S) against the adaptation scan's (E_T), scored on the MR test scans against
  the validation scans. Balanced accuracy 0.5: the encodings are indistinguishable (aligned);
  1.0: separable. It draws no random number the training draws, so the curve is the same with it.

``--set NAME=VALUE`` (repeatable) overrides one of the engine's training options
(``train.TrainConfig``, e.g. ``--set lambda_adv=10``); values are read as JSON.

``--target-encoder-lr-scale 0`` freezes E_T at its copy of E_S (then the KL and adversarial
target terms update nothing): what adaptation reaches without the target encoder learning. It is
the engine's ``lr_scale`` option (``--set lr_scale={"enc_t": 0}`` says the same).

Prints one JSON line per evaluation; ``--out`` also gets ``{"args", "curve"}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# common also puts the engine on sys.path, as for every benchmark script
from common import add_set_option, check_output, cohort_slices, count, parsed_set_options, run_main, write_record

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from vaeuda import train  # noqa: E402
from vaeuda.data import parse_slice_range  # noqa: E402
from vaeuda.demo import cohort_split, image_of  # noqa: E402
from vaeuda.diagnose import translation_contrast  # noqa: E402
from vaeuda.errors import VaeudaError  # noqa: E402
from vaeuda.experiment import HeldOutDiceProbe  # noqa: E402
from vaeuda.losses import kl_to_standard_normal  # noqa: E402
from vaeuda.modelfile import load_model  # noqa: E402

DISC_SLICES = 32          # fixed slices per image kind for the discriminator's scores
LATENT_PROBE_STEPS = 200  # Adam steps of the fresh domain classifier at each evaluation
CONTRAST_ROWS = {"x_ST (MR as CT)": "x_ST", "x_TS (CT as MR)": "x_TS"}
CONTRAST_COLUMNS = {"blood - myocardium": "blood-myo", "ring - myocardium": "ring-myo"}


def mean_score(disc, images: torch.Tensor, gan_mode: str = "lsgan") -> float:
    """Disc's score averaged over patches, then over scales. images (N, 3, S, S) -> float.
    A ``vanilla`` discriminator outputs logits: its patch scores are taken through the sigmoid, so
    that both modes read as real 1, fake 0."""
    maps = disc(images)
    if gan_mode == "vanilla":
        maps = [torch.sigmoid(m) for m in maps]
    return round(float(sum(m.mean() for m in maps) / len(maps)), 4)


@torch.no_grad()
def disc_scores(net, mr: torch.Tensor, ct: torch.Tensor, gan_mode: str = "lsgan") -> Dict[str, float]:
    """The live discriminator on real MR, x_SS (from the posterior mean), x_TS and raw x_T."""
    was_training = net.training
    net.eval()
    mu_s, _ = net.posterior(mr, "source")
    mu_t, _ = net.posterior(ct, "target")
    images = {"x_S": mr, "x_SS": net.decode(mu_s, "source"), "x_TS": net.decode(mu_t, "source"), "x_T": ct}
    scores = {name: mean_score(net.disc, x, gan_mode) for name, x in images.items()}
    net.train(was_training)
    return scores


def latent_probe(train_s: torch.Tensor, train_t: torch.Tensor, test_s: torch.Tensor, test_t: torch.Tensor,
                 seed: int, steps: int = LATENT_PROBE_STEPS, batch: int = 16) -> Dict[str, float]:
    """Domain classification of latent maps (N, C, s, s): a fresh classifier of each latent location
    from its 3 x 3 neighbourhood (a 3x3 convolution, LeakyReLU, a 1x1 head) learns source (1)
    against target (0) on the training pair for ``steps`` Adam steps and is scored on the held-out
    pair. Returns the balanced held-out accuracy over locations and the proxy A-distance
    2 (2 acc - 1) (Ben-David et al., NeurIPS 2007; 0: indistinguishable, 2: separable).
    Its randomness is its own (a forked global generator), so a training run it watches is unchanged."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = nn.Sequential(nn.Conv2d(train_s.shape[1], 32, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(32, 1, 1))
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            s = train_s[torch.randint(len(train_s), (batch,), generator=gen)]
            t = train_t[torch.randint(len(train_t), (batch,), generator=gen)]
            logits = clf(torch.cat([s, t]))
            labels = torch.cat([torch.ones_like(logits[:batch]), torch.zeros_like(logits[batch:])])
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (float((clf(test_s) > 0).float().mean()) + float((clf(test_t) <= 0).float().mean())) / 2
    return {"accuracy": round(accuracy, 4), "pad": round(2 * (2 * accuracy - 1), 4)}


@torch.no_grad()
def posterior_summary(net, x: torch.Tensor, domain: str, chunk: int = 64) -> Tuple[torch.Tensor, float]:
    """The posterior means (N, C, s, s) of slices x (N, 3, S, S) and their mean closed-form KL to N(0, I)."""
    means, kl_sum = [], 0.0
    for k in range(0, len(x), chunk):
        mu, logvar = net.posterior(x[k:k + chunk], domain)
        means.append(mu)
        kl_sum += float(kl_to_standard_normal(mu, logvar)) * len(mu)
    return torch.cat(means), kl_sum / len(x)


def default_validation_scans(cohort: Path, target: str) -> List[str]:
    """The CT training-pool scans other than the adaptation scan ``target``, at most 4 (labels unused
    in adaptation, so they can choose settings)."""
    return [s for s in cohort_split(cohort, "ct", "train") if s != target][:4]


def latent_probe_sets(cohort: Path, mr_train: torch.Tensor, target: torch.Tensor, val: List[str], cfg,
                      norm: dict, val_images: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The probe's slices (N, 3, S, S): MR training slices and the target scan's to train on, the
    cohort's MR test split and the validation scans ``val`` to score on (``val_images``: their
    slices when the caller has read them already)."""
    if not val:
        raise VaeudaError(f"{cohort}: no validation CT scan to score the latent probe on.")
    return {"train_s": mr_train, "train_t": target,
            "test_s": cohort_slices(cohort, cohort_split(cohort, "mr", "test"), cfg, norm).images,
            "test_t": val_images if val_images is not None else cohort_slices(cohort, val, cfg, norm).images}


def latent_probe_of(net, sets: Dict[str, torch.Tensor], seed: int) -> Dict[str, float]:
    """:func:`latent_probe` on ``net``'s posterior means of :func:`latent_probe_sets` (``*_s`` through
    the source encoder, ``*_t`` through the target encoder)."""
    net.eval()
    means = {k: posterior_summary(net, x, "source" if k.endswith("_s") else "target")[0] for k, x in sets.items()}
    return latent_probe(**means, seed=seed)


@torch.no_grad()
def selection_proxies(net, target: torch.Tensor, source_fractions: torch.Tensor, chunk: int = 32) -> Dict[str, float]:
    """Label-free signals of ``net`` (the model being saved) on the adaptation scan's slices
    target (N, 3, S, S), all from posterior means:

    - ``cycle_l1`` / ``rec_l1``: mean |x_TST - x_T| and |x_TT - x_T| over *every* slice, computed
      by ``train.target_proxy``. The engine's early-stop proxy (since the nineteenth session) is
      the same function on at most 64 evenly spaced slices (``train.proxy_slices``): equal where
      there are 64 or fewer, e.g. with ``--slices``; the run's own readings are ``engine_proxy``;
    - ``entropy``: Seg's mean softmax entropy over pixels, in units of log(n_classes);
    - ``fg_entropy``: the same over the pixels predicted as a structure;
    - ``semantic_cycle``: 1 - mean Dice over structures between Seg's labels of x_T (through E_T)
      and of x_TS re-encoded by E_S (the translation kept the anatomy where 0);
    - ``shift_disagreement``: 1 - mean Dice between the labels of x_T and those of x_T shifted by
      two pixels (shifted back);
    - ``class_fraction_l1``: sum over structures of |predicted fraction - source label fraction|,
      ``source_fractions`` (n_classes,) the source labels' class frequencies.
    Lower is better for all."""
    cpu = torch.device("cpu")
    out = {"cycle_l1": train.target_proxy(net, target, True, cpu),
           "rec_l1": train.target_proxy(net, target, False, cpu)}
    net.eval()
    n_classes = net.cfg.n_classes
    entropy = 0.0
    fg_entropy, fg_pixels = 0.0, 0
    counts = {k: torch.zeros(3, n_classes - 1) for k in ("semantic", "shift")}  # intersection, |a|, |b|
    class_counts = torch.zeros(n_classes)

    def overlap(key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        for c in range(1, n_classes):
            pa, pb = a == c, b == c
            counts[key][:, c - 1] += torch.tensor([float((pa & pb).sum()), float(pa.sum()), float(pb.sum())])

    for k in range(0, len(target), chunk):
        x_t = target[k:k + chunk]
        mu_t, _ = net.posterior(x_t, "target")
        mu_ts, _ = net.posterior(net.decode(mu_t, "source"), "source")   # x_TS re-encoded by E_S
        prob = torch.softmax(net.seg(mu_t), 1)
        ent = -(prob * prob.clamp_min(1e-8).log()).sum(1) / torch.log(torch.tensor(float(n_classes)))
        labels = prob.argmax(1)
        entropy += float(ent.mean()) * len(x_t)
        fg_entropy += float(ent[labels > 0].sum())
        fg_pixels += int((labels > 0).sum())
        class_counts += torch.bincount(labels.flatten(), minlength=n_classes).float()
        overlap("semantic", labels, net.seg(mu_ts).argmax(1))
        shifted = torch.roll(x_t, shifts=(2, 2), dims=(2, 3))
        overlap("shift", labels[:, 2:, 2:],
                torch.roll(net.segment_logits(shifted, "target").argmax(1), shifts=(-2, -2), dims=(1, 2))[:, 2:, 2:])

    def disagreement(key: str) -> float:
        inter, a, b = counts[key]
        present = (a + b) > 0          # a structure neither labelling shows does not count
        dice = 2 * inter[present] / (a + b)[present]
        return 1.0 - float(dice.mean()) if present.any() else 1.0

    out["entropy"] = entropy / len(target)
    out["fg_entropy"] = fg_entropy / max(fg_pixels, 1)
    out["semantic_cycle"] = disagreement("semantic")
    out["shift_disagreement"] = disagreement("shift")
    fractions = class_counts / class_counts.sum()
    out["class_fraction_l1"] = float((fractions[1:] - source_fractions[1:]).abs().sum())
    return {k: round(v, 5) for k, v in out.items()}


def fixed_slices(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:n]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a source model file")
    p.add_argument("--cohort", required=True, help="cohort folder with splits.json")
    p.add_argument("--target", required=True, help="scan prefix of the adaptation scan, e.g. ct_1013")
    p.add_argument("--val", nargs="*", help="validation scan prefixes (default: the CT training pool without --target, "
                                            "at most 4)")
    p.add_argument("--iterations", type=count(), help="adaptation iterations (default: the preset's)")
    p.add_argument("--every", type=count(), default=50, help="evaluate every N iterations (default 50)")
    p.add_argument("--seed", type=int, default=0, help="adaptation seed (default 0)")
    p.add_argument("--threads", type=count(), default=1, help="torch threads (default 1)")
    p.add_argument("--out", help="write {args, curve} to this JSON file")
    p.add_argument("--model-out", help="keep the adapted model here (default: a temporary folder, removed)")
    for switch in ("kl", "adv", "cycle", "task-consistency"):
        p.add_argument(f"--no-{switch}", action="store_true")
    add_set_option(p)
    p.add_argument("--contrast", action="store_true", help="also record the translations' LV border contrast")
    p.add_argument("--latent-probe", action="store_true",
                   help="also record how well a fresh domain classifier separates the target from the source encoding")
    p.add_argument("--proxies", action="store_true",
                   help="also record label-free model-selection signals on the adaptation scan")
    p.add_argument("--slices", help="adapt on slices A:B of the adaptation scan only (the few-shot setting)")
    p.add_argument("--target-encoder-lr-scale", type=float, default=1.0,
                   help="step E_T at this multiple of the learning rate (0: frozen at its copy of E_S)")
    args = p.parse_args(argv)
    check_output(args.out, [args.model])         # at start-up: not a traceback after the whole run
    if args.val == []:                           # the signal settings are chosen on would go unsaid
        p.error("--val needs at least one scan prefix (leave it out for the default validation scans)")
    check_output(args.model_out, [args.model])
    torch.set_num_threads(args.threads)
    overrides = {"eval_every": args.every, **parsed_set_options(p, args.set)}
    if args.target_encoder_lr_scale != 1.0:
        scales = overrides.get("lr_scale", {})      # not a dict: left for the engine to refuse
        overrides["lr_scale"] = {**scales, "enc_t": args.target_encoder_lr_scale} if isinstance(scales, dict) else scales
    cohort = Path(args.cohort)
    net, meta = load_model(args.model)
    cfg, norm = net.cfg, meta["normalisation"]
    # as train.adapt resolves it: the source model's own loss unless --set says otherwise
    gan_mode = overrides.get("gan_mode", meta["train"].get("gan_mode", "lsgan"))
    if args.target in cohort_split(cohort, "ct", "test"):   # its "test" Dice would score the scan adapted on
        raise VaeudaError(f"{args.target}: is one of the cohort's CT test scans; adapt on one of its CT training "
                          f"scans.")
    val = args.val if args.val is not None else default_validation_scans(cohort, args.target)
    device = torch.device("cpu")
    probes = {name: HeldOutDiceProbe(cohort, scans, cfg.input_size, cfg.slice_fov_mm, norm, device)
              for name, scans in (("val", val), ("test", cohort_split(cohort, "ct", "test"))) if scans}

    # two MR training scans: the discriminator's real slices and, labelled, the contrast's MR rows
    mr_set = cohort_slices(cohort, cohort_split(cohort, "mr", "train")[:2], cfg, norm, labelled=args.contrast)
    slice_range = parse_slice_range(args.slices)
    mr = fixed_slices(mr_set.images, DISC_SLICES, args.seed)
    target_images = cohort_slices(cohort, [args.target], cfg, norm).images
    adapted_on = target_images[slice_range[0]:slice_range[1]] if slice_range else target_images
    source_fractions = None
    if args.proxies:
        mr_labels = cohort_slices(cohort, cohort_split(cohort, "mr", "train"), cfg, norm, labelled=True).labels
        source_fractions = torch.bincount(torch.as_tensor(mr_labels).flatten().long(),
                                          minlength=cfg.n_classes).float()
        source_fractions /= source_fractions.sum()
    ct = fixed_slices(target_images, DISC_SLICES, args.seed)
    ct_val = cohort_slices(cohort, val, cfg, norm, labelled=True) if args.contrast else None
    probe_sets = (latent_probe_sets(cohort, mr_set.images, target_images, val, cfg, norm,
                                    ct_val.images if ct_val is not None else None)
                  if args.latent_probe else None)
    curve: List[dict] = []

    def evaluate(iteration: int, averaged, live) -> None:
        row = {"iteration": iteration}
        row.update({name: round(100 * probe(iteration, averaged)["test_dice_mean"], 2)
                    for name, probe in probes.items()})
        row["disc"] = disc_scores(live, mr, ct, gan_mode)
        if args.contrast:
            rows = translation_contrast(averaged, mr_set.images, mr_set.labels, ct_val.images, ct_val.labels)
            row["contrast"] = {short: {c: round(rows[name][col], 3) for col, c in CONTRAST_COLUMNS.items()}
                               for name, short in CONTRAST_ROWS.items()}
        if source_fractions is not None:
            row["proxies"] = selection_proxies(averaged, adapted_on, source_fractions)
        if probe_sets is not None:
            row["latent"] = latent_probe_of(averaged, probe_sets, args.seed)
        curve.append(row)
        print(json.dumps(row), flush=True)

    # iteration 0: the source model, its source encoder copied into the target one (as adapt does)
    net.copy_source_to_target()
    evaluate(0, net.eval(), net)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.model_out or Path(scratch) / "adapted.safetensors")
        meta = train.adapt(args.model, [image_of(cohort, args.target)], out, iterations=args.iterations,
                           seed=args.seed, device="cpu", use_kl=not args.no_kl, use_adv=not args.no_adv,
                           use_cycle=not args.no_cycle, use_task=not args.no_task_consistency,
                           slice_range=slice_range, callback=evaluate, overrides=overrides)
    engine_proxy = {entry["iteration"]: entry["proxy"] for entry in meta.get("history", []) if "proxy" in entry}
    for row in curve:
        if row["iteration"] in engine_proxy and "proxies" in row:
            row["proxies"]["engine_proxy"] = engine_proxy[row["iteration"]]
    if args.out:
        write_record(args.out, {"args": vars(args), "curve": curve})
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
