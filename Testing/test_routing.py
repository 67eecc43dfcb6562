"""Each loss term updates exactly the networks the paper says, and nothing else."""
import copy

import pytest
import torch

from vaeuda.losses import SegmentationLoss
from vaeuda.nets import VAEUDANet, get_preset
from vaeuda.train import (ROUTES, TrainConfig, class_weights_from, disc_loss, generator_adv_terms, routed_backward,
                          source_terms, target_terms)

# Derived by hand from Eq. 1-7 and the update rules (only E_T and D_T learn from target terms;
# task consistency updates Seg and E_Z). Where a term's path misses a network of its route,
# that network gets nothing: x_TS = D_S(D_Z(z_T)) has no D_T, the KL only sees the encoders.
EXPECTED = {
    "S_rec": {"enc_s", "enc_z", "dec_z", "dec_s"},
    "S_kl": {"enc_s", "enc_z"},
    "seg": {"enc_s", "enc_z", "seg"},
    "S_adv": {"enc_s", "enc_z", "dec_z", "dec_s"},
    "T_rec": {"enc_t", "dec_t"},
    "T_kl": {"enc_t"},
    "T_adv": {"enc_t"},
    "T_cyc": {"enc_t", "dec_t"},
    "task": {"enc_z", "seg"},
}


def _all_terms(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xs, xt = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen) + 1
    ys = torch.randint(0, 5, (2, 32, 32), generator=gen)
    seg = SegmentationLoss([0.5, 1, 1, 1, 1])
    terms, fakes = source_terms(net, xs, ys, seg, gen)
    t_terms, t_fakes = target_terms(net, xs, ys, xt, fakes["mu_s"], seg, TrainConfig(), gen)
    terms.update(t_terms)
    terms.update(generator_adv_terms(net, {**fakes, **t_fakes}, "lsgan"))    # what run_stage adds
    return terms, xs, fakes, t_fakes


def _nonzero_modules(net):
    out = set()
    for name in VAEUDANet.MODULES:
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(net, name).parameters()):
            out.add(name)
    return out


@pytest.mark.parametrize("term", sorted(EXPECTED))
def test_term_reaches_exactly_its_networks(term):
    net = VAEUDANet(get_preset("tiny")).train()
    terms, *_ = _all_terms(net)
    assert set(terms) == set(EXPECTED)
    net.zero_grad(set_to_none=True)
    routed_backward(net, {term: terms[term]})
    assert _nonzero_modules(net) == EXPECTED[term]
    assert EXPECTED[term] <= set(ROUTES[term])


def test_target_terms_never_move_shared_networks():
    """The four target terms backpropagated together (as a step does) reach E_T and D_T only: E_Z
    and D_Z are not fitted to the small target set (Eq. 4-6)."""
    net = VAEUDANet(get_preset("tiny")).train()
    terms, *_ = _all_terms(net)
    net.zero_grad(set_to_none=True)
    routed_backward(net, {term: terms[term] for term in ("T_rec", "T_kl", "T_adv", "T_cyc")})
    assert _nonzero_modules(net) == {"enc_t", "dec_t"}


def test_discriminator_loss_reaches_only_disc():
    net = VAEUDANet(get_preset("tiny")).train()
    _, xs, fakes, t_fakes = _all_terms(net)
    net.zero_grad(set_to_none=True)
    disc_loss(net, xs, [fakes["x_ss"], t_fakes["x_ts"]], "lsgan").backward()
    assert _nonzero_modules(net) == {"disc"}


def test_grouped_backward_equals_sum_of_single_terms():
    net = VAEUDANet(get_preset("tiny")).train()
    terms, *_ = _all_terms(net)
    routed_backward(net, dict(terms))
    together = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    single = {}
    for term in EXPECTED:
        net.zero_grad(set_to_none=True)
        t, *_ = _all_terms(net)
        routed_backward(net, {term: t[term]})
        for n, p in net.named_parameters():
            if p.grad is not None:
                single[n] = single.get(n, 0) + p.grad
    assert together.keys() == single.keys()
    for n in together:
        assert torch.allclose(together[n], single[n], atol=1e-5, rtol=1e-4), n


def test_switched_off_target_terms_are_not_computed():
    """--no-cycle and --no-task-consistency leave their terms out (not computed and weighted 0: the
    task term would draw a sample from the run's generator)."""
    net = VAEUDANet(get_preset("tiny")).train()
    gen = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen)
    ys = torch.randint(0, 5, (2, 32, 32), generator=gen)
    seg = SegmentationLoss([0.5, 1, 1, 1, 1])
    _, fakes = source_terms(net, xs, ys, seg, gen)
    for switches, expected in (({"use_cycle": False}, {"T_rec", "T_kl", "task"}),
                               ({"use_task": False}, {"T_rec", "T_kl", "T_cyc"})):
        terms, _ = target_terms(net, xs, ys, xt, fakes["mu_s"], seg, TrainConfig(**switches), gen)
        assert set(terms) == expected, switches


def test_task_consistency_renders_x_st_from_the_source_posterior_mean(monkeypatch):
    """x_ST = D_T(D_Z(mu_S)) (Eq. 7: one image per x_S), not a noisy sample of q(Z|x_S)."""
    net = VAEUDANet(get_preset("tiny")).train()
    decoded = []
    real_decode = net.decode
    monkeypatch.setattr(net, "decode", lambda z, domain: decoded.append((z.detach().clone(), domain)) or real_decode(z, domain))
    terms, xs, fakes, _ = _all_terms(net)
    mu_s, logvar_s = net.posterior(xs, "source")
    assert torch.allclose(fakes["mu_s"], mu_s) and logvar_s.exp().min() > 1e-3   # a sample would differ from mu
    to_target = [z for z, domain in decoded if domain == "target"]
    # D_T decodes z_T (x_TT), mu_TS (cycle) and, last, the source mean (x_ST)
    assert len(to_target) == 3 and torch.equal(to_target[-1], fakes["mu_s"].detach())
    assert "task" in terms


def _disc_reading_first_voxel(net, monkeypatch):
    """Disc replaced by one whose single-scale score is its input's first voxel, so a test can tell
    which image it scored."""
    monkeypatch.setattr(net.disc, "forward", lambda x: [x.reshape(len(x), -1)[:, :1]])


def test_generator_adv_terms_score_x_ss_and_x_ts_against_the_real_label(monkeypatch):
    """S_adv = (D(x_SS) - 1)^2, T_adv = (D(x_TS) - 1)^2 (LSGAN, generator side of Eq. 3 and 5)."""
    net = VAEUDANet(get_preset("tiny"))
    _disc_reading_first_voxel(net, monkeypatch)
    x_ss, x_ts = torch.full((2, 3, 4, 4), 0.8), torch.full((2, 3, 4, 4), 0.3)
    terms = generator_adv_terms(net, {"x_ss": x_ss, "x_ts": x_ts}, "lsgan")
    assert terms["S_adv"].item() == pytest.approx(0.04)       # (0.8 - 1)^2
    assert terms["T_adv"].item() == pytest.approx(0.49)       # (0.3 - 1)^2
    assert set(generator_adv_terms(net, {"x_ss": x_ss}, "lsgan")) == {"S_adv"}   # the source stage


def test_discriminator_loss_averages_its_fake_sets(monkeypatch):
    """Disc: (D(x_S) - 1)^2 + mean over the fake sets of D(fake)^2, so adding x_TS does not double
    the weight of the fake side."""
    net = VAEUDANet(get_preset("tiny"))
    _disc_reading_first_voxel(net, monkeypatch)
    real = torch.full((2, 3, 4, 4), 0.9)
    fakes = [torch.full((2, 3, 4, 4), 0.2), torch.full((2, 3, 4, 4), 0.4)]
    # 0.1^2 + (0.2^2 + 0.4^2) / 2 = 0.01 + 0.10
    assert disc_loss(net, real, fakes, "lsgan").item() == pytest.approx(0.11)
    assert disc_loss(net, real, fakes[:1], "lsgan").item() == pytest.approx(0.05)


def test_task_consistency_does_not_differentiate_through_the_rendering():
    """x_ST is an input to the task term: no gradient flows back into mu_S (hence E_Z through the
    source path) or D_T."""
    net = VAEUDANet(get_preset("tiny")).train()
    terms, _, fakes, _ = _all_terms(net)
    grads = torch.autograd.grad(terms["task"], [fakes["mu_s"], *net.dec_t.parameters()], allow_unused=True)
    assert all(g is None for g in grads)


def test_paths_take_the_encoders_eq_6_and_7_name(monkeypatch):
    """Encoders in order: E_T on x_T, E_S on x_TS (cycle, Eq. 6), E_T on x_ST (task, Eq. 7); the
    cycle decodes the posterior mean of x_TS; Seg reads a sample of q(Z|x_S), not its mean (Eq. 2),
    and in the task term a sample of q(Z|x_ST), not its mean (z drawn at each iteration)."""
    net = VAEUDANet(get_preset("tiny")).train()
    domains, decoded, seg_inputs, samples = [], [], [], []
    real_posterior, real_decode, real_seg, real_sample = net.posterior, net.decode, net.seg.forward, net.sample

    def posterior(x, domain):
        domains.append(domain)
        return real_posterior(x, domain)

    def sample(mu, logvar, gen):
        samples.append(real_sample(mu, logvar, gen))
        return samples[-1]

    monkeypatch.setattr(net, "posterior", posterior)
    monkeypatch.setattr(net, "decode", lambda z, domain: decoded.append((z.detach().clone(), domain)) or real_decode(z, domain))
    monkeypatch.setattr(net.seg, "forward", lambda z: seg_inputs.append(z) or real_seg(z))
    monkeypatch.setattr(net, "sample", sample)
    gen = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen) + 1
    ys = torch.randint(0, 5, (2, 32, 32), generator=gen)
    seg = SegmentationLoss([0.5, 1, 1, 1, 1])
    _, fakes = source_terms(net, xs, ys, seg, gen)
    _, t_fakes = target_terms(net, xs, ys, xt, fakes["mu_s"], seg, TrainConfig(), gen)
    assert domains == ["source", "target", "source", "target"]
    assert seg_inputs[0] is samples[0] and not torch.equal(samples[0], fakes["mu_s"])
    mu_ts, _ = real_posterior(t_fakes["x_ts"], "source")
    mu_t, _ = real_posterior(xt, "target")
    # Decodes in order: x_SS and x_TT, x_TS from samples (the VAE's reparameterised z, Eq. 1 and 4),
    # the cycle's D_T from the mean of x_TS's posterior, x_ST from mu_S.
    assert [domain for _, domain in decoded] == ["source", "target", "source", "target", "target"]
    assert torch.equal(decoded[0][0], samples[0].detach())
    assert torch.equal(decoded[1][0], samples[1].detach()) and torch.equal(decoded[2][0], samples[1].detach())
    assert not torch.allclose(samples[1], mu_t, atol=1e-3)              # a sample, not the mean
    assert torch.allclose(decoded[3][0], mu_ts.detach(), atol=1e-6)     # the cycle's D_T input
    assert torch.equal(decoded[4][0], fakes["mu_s"].detach())
    # the task term: Seg's second input is the third sample, drawn from the posterior of x_ST
    mu_st, _ = real_posterior(real_decode(fakes["mu_s"].detach(), "target"), "target")
    assert len(samples) == 3 and len(seg_inputs) == 2 and seg_inputs[1] is samples[2]
    assert not torch.allclose(samples[2], mu_st, atol=1e-3)


def test_term_weights_and_ablation_switches():
    """Eq. 8 with the paper's lambdas; each switch zeroes its own terms only."""
    paper = {"S_rec": 1.0, "S_kl": 0.1, "seg": 1.0, "S_adv": 1.0,
             "T_rec": 1.0, "T_kl": 0.1, "T_adv": 1.0, "T_cyc": 10.0, "task": 1.0}
    assert TrainConfig().weights() == paper
    for switch, zeroed in (("use_kl", {"S_kl", "T_kl"}), ("use_adv", {"S_adv", "T_adv"}),
                           ("use_cycle", {"T_cyc"}), ("use_task", {"task"})):
        weights = TrainConfig(**{switch: False}).weights()
        assert weights == {k: 0.0 if k in zeroed else v for k, v in paper.items()}, switch
    # each lambda weights its own terms: distinct values tell a swap apart (the paper's are mostly 1)
    assert TrainConfig(lambda_rec=2.0, lambda_seg=3.0, lambda_adv=5.0, lambda_cyc=7.0, lambda_kl=11.0).weights() == {
        "S_rec": 2.0, "T_rec": 2.0, "seg": 3.0, "task": 3.0, "S_adv": 5.0, "T_adv": 5.0, "T_cyc": 7.0,
        "S_kl": 11.0, "T_kl": 11.0}


def test_class_weights_are_inverse_square_root_frequencies_of_mean_one():
    """Counts 16, 4, 4, 1, 1 (26 in all): sqrt(26 / n) = 1.2748, 2.5495, 2.5495, 5.0990, 5.0990,
    mean 3.3144, so the weights are 0.3846, 0.7692, 0.7692, 1.5385, 1.5385."""
    labels = torch.tensor([0] * 16 + [1] * 4 + [2] * 4 + [3, 4], dtype=torch.uint8).reshape(1, 2, 13)
    assert class_weights_from(labels) == pytest.approx((0.3846, 0.7692, 0.7692, 1.5385, 1.5385), abs=1e-4)


def test_a_class_absent_from_the_labels_still_gets_a_weight_as_if_seen_once():
    """Labels of classes 0 and 1 only (7 and 1 pixels): all five classes get a weight, the three
    absent ones counted as 1 pixel (no division by zero). Counts 7, 1, 1, 1, 1 (11 in all):
    sqrt(11 / n) = 1.2536, 3.3166 (x4), mean 2.9040, so the weights are 0.4317, 1.1421 (x4)."""
    labels = torch.tensor([0] * 7 + [1], dtype=torch.uint8).reshape(1, 2, 4)
    assert class_weights_from(labels) == pytest.approx((0.4317, 1.1421, 1.1421, 1.1421, 1.1421), abs=1e-4)


def test_a_batch_draws_slices_by_their_weights_with_replacement():
    """_batch: b slice indices drawn by weight with replacement, so a set with fewer drawable slices
    than the batch (a few-shot target of 3 slices, batch 8) still fills it; labels come as long
    class indices for the losses, and an unlabelled (target) set gives none."""
    from vaeuda.data import SliceSet
    from vaeuda.train import _batch
    images = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    labels = torch.arange(3, dtype=torch.uint8).reshape(3, 1, 1).expand(3, 2, 2).contiguous()
    gen = torch.Generator().manual_seed(0)
    x, y = _batch(SliceSet(images, labels, torch.zeros(3, dtype=torch.int32)), torch.tensor([0.0, 1.0, 0.0]), 4, gen)
    assert torch.equal(x, images[[1, 1, 1, 1]]) and torch.equal(y, torch.ones(4, 2, 2, dtype=torch.long))
    x, y = _batch(SliceSet(images, None, torch.zeros(3, dtype=torch.int32)), torch.ones(3), 8, gen)
    assert x.shape == (8, 3, 2, 2) and y is None


def test_remapped_source_input_is_encoded_but_the_original_is_reconstructed(monkeypatch):
    """train-source --intensity-remap: E_S reads the remapped batch, while S_rec scores x_SS against
    the original xs (the decoder must render MR whatever contrast came in)."""
    net = VAEUDANet(get_preset("tiny")).train()
    gen = torch.Generator().manual_seed(0)
    xs, remapped = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen)
    ys = torch.randint(0, 5, (2, 32, 32), generator=gen)
    seen = []
    real_posterior = net.posterior
    monkeypatch.setattr(net, "posterior", lambda x, domain: seen.append(x) or real_posterior(x, domain))
    terms, fakes = source_terms(net, xs, ys, SegmentationLoss([0.5, 1, 1, 1, 1]), gen, remapped)
    assert len(seen) == 1 and seen[0] is remapped
    assert torch.allclose(terms["S_rec"], (fakes["x_ss"] - xs).abs().mean())
    assert not torch.allclose(terms["S_rec"], (fakes["x_ss"] - remapped).abs().mean())


def _run_stage(tmp_path, name="adapt", iterations=1, **options):
    """run_stage on random slices (tiny preset, fixed seeds): ``iterations`` steps of stage ``name``
    ("adapt" with an unlabelled target set, "source" without one) -> (the network before, after).
    The last of the 4 labelled slices holds no structure."""
    from vaeuda import train as train_mod
    from vaeuda.data import SliceSet
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (4, 32, 32), generator=gen).byte()
    labels[3] = 0
    source = SliceSet(torch.randn(4, 3, 32, 32, generator=gen), labels, torch.zeros(4, dtype=torch.int32), ["mr"])
    target = SliceSet(torch.randn(4, 3, 32, 32, generator=gen) + 1, None, torch.zeros(4, dtype=torch.int32), ["ct"])
    torch.manual_seed(0)
    net = VAEUDANet(get_preset("tiny"))
    before = copy.deepcopy(net)
    cfg = TrainConfig(**{"batch_size": 2, "class_weights": (1.0,) * 5, "checkpoint_every": 10 ** 9,
                         "eval_every": 10 ** 9, **options})
    stage = train_mod.Stage(name, source, target if name == "adapt" else None, iterations,
                            tmp_path / f"{name}.safetensors", {"stage": name, "provenance": {}})
    train_mod.run_stage(net, stage, cfg, torch.device("cpu"), seed=0)
    return before, net


def _first_adaptation_step(monkeypatch, tmp_path, **options):
    """The weighted terms the training loop hands to routed_backward in the first iteration of an
    adaptation stage (tiny preset, random slices, fixed seeds: the raw terms are the same each run)."""
    from vaeuda import train as train_mod
    captured = []
    real = train_mod.routed_backward
    monkeypatch.setattr(train_mod, "routed_backward",
                        lambda net, weighted: captured.append({k: v.detach().clone() for k, v in weighted.items()})
                        or real(net, weighted))
    _run_stage(tmp_path, **options)
    (weighted,) = captured
    return weighted


def test_the_loop_weights_each_term_by_its_lambda_and_drops_switched_off_terms(monkeypatch, tmp_path):
    """Eq. 8 as the loop applies it: lambda_cyc 10 (vs 1) scales T_cyc tenfold, lambda_kl 0.1 (vs 1)
    scales both KL terms by a tenth, and --no-kl removes both KL terms; every other term is unchanged."""
    default = _first_adaptation_step(monkeypatch, tmp_path)
    assert set(default) == set(EXPECTED)
    cycle_one = _first_adaptation_step(monkeypatch, tmp_path, lambda_cyc=1.0)
    kl_one = _first_adaptation_step(monkeypatch, tmp_path, lambda_kl=1.0)
    no_kl = _first_adaptation_step(monkeypatch, tmp_path, use_kl=False)
    assert torch.allclose(default["T_cyc"], 10 * cycle_one["T_cyc"], rtol=1e-5)
    for term in ("S_kl", "T_kl"):
        assert torch.allclose(default[term], 0.1 * kl_one[term], rtol=1e-5)
    assert set(no_kl) == set(EXPECTED) - {"S_kl", "T_kl"}
    for other, changed in ((cycle_one, {"T_cyc"}), (kl_one, {"S_kl", "T_kl"}), (no_kl, set())):
        for term in set(other) - changed:
            assert torch.allclose(other[term], default[term], rtol=1e-5), term


def test_the_generators_meet_the_discriminator_after_its_step_under_autocast(monkeypatch, tmp_path):
    """An autocast region keeps the bf16 copies of the weights it has cast until it ends: had the
    Disc step and the generators' adversarial terms shared one region, on CUDA the generators would
    be scored by the Disc of before its step. CPU bf16 autocast keeps the same cache, so the loop
    runs under it here, with a step large enough to change the bf16 weights."""
    from vaeuda import train as train_mod
    monkeypatch.setattr(train_mod, "_mixed_precision", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    real = train_mod.generator_adv_terms
    seen = []

    def recording(net, fakes, mode):
        terms = real(net, fakes, mode)
        current = copy.deepcopy(net)          # new tensors: cast afresh, whatever the region has cached
        with torch.no_grad():
            fresh = real(current, {k: v.detach() for k, v in fakes.items()}, mode)
        seen.append(({k: v.detach().float() for k, v in terms.items()}, {k: v.float() for k, v in fresh.items()}))
        return terms

    monkeypatch.setattr(train_mod, "generator_adv_terms", recording)
    _first_adaptation_step(monkeypatch, tmp_path, lr=0.05)
    ((terms, fresh),) = seen
    assert set(terms) == {"S_adv", "T_adv"}
    for name in terms:
        assert torch.equal(terms[name], fresh[name]), name


def _unchanged(before, after, name):
    return all(torch.equal(a, b) for a, b in zip(getattr(before, name).state_dict().values(),
                                                 getattr(after, name).state_dict().values()))


def test_each_step_starts_from_this_iterations_gradients_alone(monkeypatch, tmp_path):
    """Both optimisers clear their gradients every iteration: the generators' routed backward meets
    no gradient left from the iteration before, and the Disc steps on the gradient of this
    iteration's Disc loss, not on a sum over iterations."""
    from vaeuda import train as train_mod
    real_disc_loss, real_backward, real_adv = train_mod.disc_loss, train_mod.routed_backward, train_mod.generator_adv_terms
    expected, leftovers, disc_steps = [], [], []

    def disc_loss(net, *args):
        loss = real_disc_loss(net, *args)
        expected.append(torch.autograd.grad(loss, list(net.disc.parameters()), retain_graph=True))
        return loss

    def generator_adv_terms(net, *args):        # called right after the Disc's step
        disc_steps.append(all(torch.equal(p.grad, g) for p, g in zip(net.disc.parameters(), expected[-1])))
        return real_adv(net, *args)

    def routed_backward(net, weighted):
        leftovers.append(any(p.grad is not None and bool(p.grad.any())
                             for m in train_mod.GENERATOR_NETS for p in getattr(net, m).parameters()))
        real_backward(net, weighted)
    monkeypatch.setattr(train_mod, "disc_loss", disc_loss)
    monkeypatch.setattr(train_mod, "generator_adv_terms", generator_adv_terms)
    monkeypatch.setattr(train_mod, "routed_backward", routed_backward)
    _run_stage(tmp_path, iterations=2)
    assert leftovers == [False, False] and disc_steps == [True, True]


def test_networks_without_a_gradient_in_a_stage_are_not_touched_weight_decay_included(tmp_path):
    """Docs/method.md: the source stage gives E_T and D_T no gradient, so Adam (weight decay 1e-4)
    leaves them as they were; with --no-adv adaptation never steps the Disc."""
    before, after = _run_stage(tmp_path, "source", iterations=2)
    assert _unchanged(before, after, "enc_t") and _unchanged(before, after, "dec_t")
    assert not _unchanged(before, after, "enc_s") and not _unchanged(before, after, "disc")
    before, after = _run_stage(tmp_path, "adapt", iterations=2, use_adv=False)
    assert _unchanged(before, after, "disc") and not _unchanged(before, after, "enc_t")


def test_the_loop_draws_by_the_sampling_weights_and_augments_both_batches(monkeypatch, tmp_path):
    """Each iteration draws the labelled batch with TrainConfig.background_weight for its slices without
    a structure (the last one here) and the target batch uniformly, and augments both (the target
    batch without labels)."""
    from vaeuda import train as train_mod
    drawn, augmented = [], []
    real_batch, real_augment = train_mod._batch, train_mod.augment_batch
    monkeypatch.setattr(train_mod, "_batch", lambda data, weights, b, gen: drawn.append(weights.tolist())
                        or real_batch(data, weights, b, gen))
    monkeypatch.setattr(train_mod, "augment_batch", lambda x, y, cfg, gen: augmented.append(y is None)
                        or real_augment(x, y, cfg, gen))
    _run_stage(tmp_path, background_weight=0.5)
    assert drawn == [[1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]]
    assert augmented == [False, True]
