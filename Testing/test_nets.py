"""Shapes of every network in every preset, and the DRN-26 layout."""
import pytest
import torch

from vaeuda.choices import PANEL_PRESET_NAMES, PRESET_NAMES
from vaeuda.errors import VaeudaError
from vaeuda.nets import PRESETS, DRNBasicBlock, NetConfig, ResBlock, VAEUDANet, get_preset


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_shapes(preset):
    cfg = get_preset(preset)
    net = VAEUDANet(cfg).eval()
    s, c = cfg.input_size, cfg.latent_channels
    x = torch.randn(1, 3, s, s)
    with torch.no_grad():
        h = net.enc_s(x)
        assert h.shape == (1, c, s // 4, s // 4)
        assert net.enc_t(x).shape == h.shape
        mu, logvar = net.enc_z(h)
        assert mu.shape == logvar.shape == h.shape
        assert net.dec_z(mu).shape == h.shape
        assert net.dec_s(h).shape == net.dec_t(h).shape == (1, 3, s, s)
        assert net.seg(mu).shape == (1, cfg.n_classes, s, s)
        scores = net.disc(x)
        assert len(scores) == cfg.disc_scales
        for k, sc in enumerate(scores):
            assert sc.shape == (1, 1, s // 2 ** (cfg.disc_layers + k), s // 2 ** (cfg.disc_layers + k))


def test_paper_preset_is_the_paper():
    cfg = PRESETS["paper"]
    assert cfg.input_size == 256 and cfg.in_channels == 3
    assert cfg.latent_channels == 256 and cfg.latent_size == 64
    # DRN-C-26: channels, depths, dilations 2 and 4 late, no residual in the last two stages
    assert cfg.drn_channels == (16, 32, 64, 128, 256, 512, 512, 512)
    assert cfg.drn_layers == (1, 1, 2, 2, 2, 2, 1, 1)
    assert cfg.drn_dilations[4:6] == (2, 4)
    net = VAEUDANet(cfg)
    convs = [m for m in net.seg.stages.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    # two per basic block: (1 + 1 + 2 + 2 + 2 + 2 + 1 + 1) x 2 = 24 (+ stage-0 7x7 + head = 26 weighted layers, + shortcuts)
    assert len(convs) == 2 * sum(cfg.drn_layers) == 24
    assert net.seg.stages[0][0].in_channels == 256          # first layer takes the latent map
    # DRN's output stride 8: the latent is already at 1/4 of the input, so the stages halve it once
    # more (256 -> 64 -> 32) before the head upsamples to the input size
    with torch.no_grad():
        assert net.seg.stages(torch.zeros(1, 256, 64, 64)).shape[-2:] == (32, 32)


def test_posterior_covariance_is_predicted():
    """The log-variance is a function of the image, not a constant (nor the identity's zero): it
    differs between two images and across positions of one."""
    torch.manual_seed(0)
    net = VAEUDANet(get_preset("tiny"))
    x = torch.randn(2, 3, 32, 32)
    mu, logvar = net.posterior(x, "source")
    assert not torch.allclose(logvar, torch.zeros_like(logvar))
    assert not torch.allclose(logvar[0], logvar[1])
    assert logvar[0].std(dim=(1, 2)).min() > 0
    assert set(dict(net.enc_z.named_children())) >= {"mu", "logvar"}
    # its own branch: moving the log-variance branch's last bias moves logvar, not mu
    assert not torch.allclose(mu, logvar)
    with torch.no_grad():
        net.enc_z.logvar[-1].bias += 0.5
    mu2, logvar2 = net.posterior(x, "source")
    assert torch.equal(mu2, mu) and torch.allclose(logvar2, (logvar + 0.5).clamp(-8, 8), atol=1e-5)


def test_config_round_trip_and_unknown_fields():
    cfg = get_preset("cpu")
    assert NetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(VaeudaError, match="unknown fields"):
        NetConfig.from_dict({**cfg.to_dict(), "wings": 2})
    with pytest.raises(VaeudaError, match=r"^--preset must be one of cpu, paper, tiny, not 'huge'\.$"):
        get_preset("huge")


def test_the_preset_names_offered_are_the_presets_defined():
    """choices.PRESET_NAMES (torch-free, for the command line and Slicer) lists nets.PRESETS."""
    assert sorted(PRESET_NAMES) == sorted(PRESETS)
    assert set(PANEL_PRESET_NAMES) < set(PRESETS)


def test_drn_is_c_26_with_its_dilations_and_no_residual_in_the_last_two_stages():
    """DRN-C-26 (fyu/drn drn_c_26): a 7x7 convolution, stages of basic blocks with depths
    (1, 1, 2, 2, 2, 2, 1, 1), residual in stages 1-6 and not in 7-8; dilation 1 in stages 1-4,
    2 and 4 in stages 5-6, 2 then 1 in stages 7-8, in both convolutions of every block;
    1 + 24 + 1 weight layers with the head (1x1 shortcuts aside)."""
    cfg = PRESETS["paper"]
    assert cfg.drn_dilations == (1, 1, 1, 1, 2, 4, 2, 1) and cfg.drn_layers == (1, 1, 2, 2, 2, 2, 1, 1)
    seg = VAEUDANet(cfg).seg
    for stage, dilation in enumerate(cfg.drn_dilations, start=1):
        blocks = list(seg.stages[stage])
        assert len(blocks) == cfg.drn_layers[stage - 1] and all(isinstance(b, DRNBasicBlock) for b in blocks), stage
        assert all(b.residual == (stage <= 6) for b in blocks), stage
        assert all(b.shortcut is None for b in blocks) if stage > 6 else True
        convs = [m for m in seg.stages[stage].modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) == 2 * len(blocks), stage
        assert all(c.dilation == (dilation, dilation) and c.padding == (dilation, dilation) for c in convs), stage
    weight_layers = [m for m in seg.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert len(weight_layers) + 1 == 26     # with the 1x1 head
    assert seg.stages[0][0].kernel_size == (7, 7)


def test_a_drn_residual_block_adds_its_input_and_a_plain_one_does_not():
    """With both convolutions zeroed, a residual block returns relu(x); a plain block returns 0."""
    x = torch.randn(2, 4, 6, 6)
    for residual in (True, False):
        block = DRNBasicBlock(4, 4, 1, 1, residual=residual).eval()
        for conv in (block.conv1, block.conv2):
            torch.nn.init.zeros_(conv.weight)
        expected = torch.relu(x) if residual else torch.zeros_like(x)
        assert torch.allclose(block(x), expected)


def test_posterior_branches_are_the_last_blocks_of_the_shared_encoder():
    """E_Z's last n_res_branch blocks are duplicated for mu and logvar: n_res_branch - 1 residual
    blocks and a 1x1 output convolution in each branch, after n_res_shared shared ones."""
    cfg = PRESETS["paper"]
    enc_z = VAEUDANet(cfg).enc_z
    assert len(enc_z.trunk) == cfg.n_res_shared
    for branch in (enc_z.mu, enc_z.logvar):
        assert len(branch) == cfg.n_res_branch
        assert all(isinstance(b, ResBlock) for b in branch[:-1])
        assert isinstance(branch[-1], torch.nn.Conv2d) and branch[-1].kernel_size == (1, 1)


def test_sample_has_the_posterior_mean_and_standard_deviation():
    """z = mu + exp(logvar / 2) * eps: logvar = log 4 gives standard deviation 2 around mu = 3."""
    mu, logvar = torch.full((200_000,), 3.0), torch.full((200_000,), float(torch.log(torch.tensor(4.0))))
    z = VAEUDANet.sample(mu, logvar, torch.Generator().manual_seed(0))
    assert z.mean().item() == pytest.approx(3.0, abs=0.02) and z.std().item() == pytest.approx(2.0, abs=0.02)


def test_log_variance_is_bounded():
    """|logvar| <= logvar_clamp (8), so exp() stays finite however far the branch strays."""
    cfg = get_preset("tiny")
    net = VAEUDANet(cfg)
    with torch.no_grad():
        net.enc_z.logvar[-1].bias.fill_(100.0)
    _, logvar = net.posterior(torch.randn(1, 3, cfg.input_size, cfg.input_size), "source")
    assert torch.all(logvar == cfg.logvar_clamp)
