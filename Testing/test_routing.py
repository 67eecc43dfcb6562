"""Each loss term updates exactly the networks the paper says, and nothing else."""
import pytest
import torch

from vaeuda.losses import SegmentationLoss, gan_loss
from vaeuda.nets import VAEUDANet, get_preset
from vaeuda.train import ROUTES, TrainConfig, disc_loss, routed_backward, source_terms, target_terms

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
    terms["S_adv"] = gan_loss(net.disc(fakes["x_ss"]), True)
    terms["T_adv"] = gan_loss(net.disc(t_fakes["x_ts"]), True)
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
    for term in ("T_rec", "T_kl", "T_adv", "T_cyc"):
        assert not {"enc_z", "dec_z", "enc_s", "dec_s", "seg", "disc"} & set(ROUTES[term])


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
