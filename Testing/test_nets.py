"""Shapes of every network in every preset, and the DRN-26 layout."""
import pytest
import torch

from vaeuda.choices import PANEL_PRESET_NAMES, PRESET_NAMES
from vaeuda.errors import VaeudaError
from vaeuda.nets import (PRESETS, DomainDecoder, DomainEncoder, DRNBasicBlock, MultiScaleDiscriminator, NetConfig, ResBlock,
                         SharedDecoder, SharedEncoder, VAEUDANet, get_preset)


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
    # only stage 4 keeps DRN's stride (Docs/method.md); log sigma^2 clamped to +-8; a 192 mm field of view
    assert cfg.drn_strides == (1, 1, 1, 2, 1, 1, 1, 1)
    assert cfg.logvar_clamp == 8 and cfg.slice_fov_mm == 192
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


def test_get_preset_gives_a_copy_that_leaves_the_preset_unchanged():
    """A caller that edits its configuration (as --input-size does) must not edit the preset for the next one."""
    cfg = get_preset("tiny")
    cfg.input_size = 48
    assert PRESETS["tiny"].input_size == get_preset("tiny").input_size == 32


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
    """|logvar| <= logvar_clamp (8), so exp() stays finite however far the branch strays, either way."""
    cfg = get_preset("tiny")
    net = VAEUDANet(cfg)
    for bias in (100.0, -100.0):
        with torch.no_grad():
            net.enc_z.logvar[-1].bias.fill_(bias)
        _, logvar = net.posterior(torch.randn(1, 3, cfg.input_size, cfg.input_size), "source")
        assert torch.all(logvar == (cfg.logvar_clamp if bias > 0 else -cfg.logvar_clamp))


def _layout(blocks):
    """Each module of ``blocks``: a reflect-padded convolution block as (kernel, stride, in, out, bias,
    what follows the convolution), any other module by its class name (and an upsampling's mode)."""
    out = []
    for b in blocks:
        if isinstance(b, torch.nn.Sequential) and isinstance(b[0], torch.nn.ReflectionPad2d):
            conv = b[1]
            assert b[0].padding == ((conv.kernel_size[0] - 1) // 2,) * 4      # the size kept (stride 1) or halved
            out.append((conv.kernel_size[0], conv.stride[0], conv.in_channels, conv.out_channels, conv.bias is not None,
                        tuple(type(m).__name__ for m in b[2:])))
        elif isinstance(b, torch.nn.Upsample):
            out.append(("Upsample", b.scale_factor, b.mode))
        else:
            out.append(type(b).__name__)
    return out


def test_encoders_and_decoders_have_the_layers_of_the_method_table():
    """Docs/method.md's table at the paper preset: E_S / E_T a 7x7 convolution, two 4x4 stride-2 ones
    and 1 residual block; E_Z 1 shared block; D_Z 2 blocks; D_S / D_T 1 block, 2 x (nearest x2 + 5x5
    convolution) and a linear 7x7 convolution to 3 channels. Convolutions followed by instance norm
    carry no bias, and the norm has a learnt scale and shift."""
    cfg = PRESETS["paper"]
    enc, enc_z, dec_z, dec = DomainEncoder(cfg), SharedEncoder(cfg), SharedDecoder(cfg), DomainDecoder(cfg)
    norm_relu = ("InstanceNorm2d", "ReLU")
    assert _layout(enc.net) == [(7, 1, 3, 64, False, norm_relu), (4, 2, 64, 128, False, norm_relu),
                                (4, 2, 128, 256, False, norm_relu), "ResBlock"]
    assert _layout(enc_z.trunk) == ["ResBlock"] and _layout(dec_z.net) == ["ResBlock", "ResBlock"]
    assert _layout(dec.net) == ["ResBlock", ("Upsample", 2.0, "nearest"), (5, 1, 256, 128, False, norm_relu),
                                ("Upsample", 2.0, "nearest"), (5, 1, 128, 64, False, norm_relu), (7, 1, 64, 3, True, ())]
    # a residual block: conv-norm-ReLU, conv-norm (no ReLU before the skip is added)
    nets = torch.nn.ModuleList([enc, enc_z, dec_z, dec])
    blocks = [m for m in nets.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 1 + (1 + 2 * 1) + 2 + 1        # E_S; E_Z's trunk and its two branches; D_Z; D_S
    assert all(_layout(b.body) == [(3, 1, 256, 256, False, norm_relu), (3, 1, 256, 256, False, ("InstanceNorm2d",))]
               for b in blocks)
    assert all(m.affine for m in nets.modules() if isinstance(m, torch.nn.InstanceNorm2d))


def test_a_residual_block_adds_its_body_to_its_input():
    """With the last norm's scale zeroed and its shift -0.5, the body outputs -0.5 everywhere (no ReLU
    after it), so the block returns x - 0.5."""
    block = ResBlock(4)
    with torch.no_grad():
        block.body[1][2].weight.zero_()
        block.body[1][2].bias.fill_(-0.5)
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(block(x), x - 0.5)


def test_the_posterior_branches_read_the_shared_trunk_and_logvar_is_clamped_to_its_bound():
    """Made transparent by hand: the trunk block adds 0.25 (last norm scale 0, shift 0.25) and each
    branch is a 1x1 identity convolution (n_res_branch 1), the log-variance one with bias 0.5; so
    mu = h + 0.25 and logvar = clamp(h + 0.75, -3, 3) with logvar_clamp 3 (both bounds reached)."""
    import dataclasses
    cfg = dataclasses.replace(get_preset("tiny"), n_res_branch=1, logvar_clamp=3.0)
    enc_z = VAEUDANet(cfg).enc_z
    c = cfg.latent_channels
    with torch.no_grad():
        enc_z.trunk[0].body[1][2].weight.zero_()
        enc_z.trunk[0].body[1][2].bias.fill_(0.25)
        for branch, bias in ((enc_z.mu, 0.0), (enc_z.logvar, 0.5)):
            assert len(branch) == 1
            branch[0].weight.copy_(torch.eye(c).reshape(c, c, 1, 1))
            branch[0].bias.fill_(bias)
    h = 4 * torch.randn(2, c, 8, 8, generator=torch.Generator().manual_seed(0))
    mu, logvar = enc_z(h)
    assert torch.allclose(mu, h + 0.25, atol=1e-6)
    assert torch.allclose(logvar, (h + 0.75).clamp(-3, 3), atol=1e-6)
    assert logvar.min() == -3 and logvar.max() == 3


def test_sample_is_mu_plus_sigma_times_the_generators_normal_draw():
    """z = mu + exp(logvar / 2) * eps with eps drawn from the generator passed in: the same seed gives
    the same eps, so z is known exactly."""
    mu = torch.tensor([[0.0, 1.0], [-2.0, 3.0]])
    logvar = torch.tensor([[0.0, 2.0], [-2.0, 4.0]])
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
    z = VAEUDANet.sample(mu, logvar, torch.Generator().manual_seed(7))
    assert torch.allclose(z, mu + torch.tensor([[1.0, 2.718281828], [0.367879441, 7.389056099]]) * eps)


def test_a_drn_block_applies_relu_after_its_first_norm_and_its_second_norm():
    """Eval mode, BatchNorm at its initial statistics: conv1 zeroed and bn1's shift -1 give relu(-1) = 0,
    so conv2 (an identity kernel) sees 0 and bn2 (scale 2, shift 0.5) outputs 0.5: relu(x + 0.5)."""
    block = DRNBasicBlock(4, 4, 1, 2).eval()
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.bn1.bias.fill_(-1.0)
        block.conv2.weight.zero_()
        block.conv2.weight[:, :, 1, 1] = torch.eye(4)
        block.bn2.weight.fill_(2.0)
        block.bn2.bias.fill_(0.5)
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(block(x), torch.relu(x + 0.5), atol=1e-5)


def test_a_strided_drn_block_of_one_width_has_a_strided_shortcut_and_a_plain_one_has_none():
    """The identity cannot be added to a halved map: stride 2 needs the 1x1 shortcut even when the width
    stays; a non-residual block never adds its input, so it carries no shortcut weights."""
    block = DRNBasicBlock(4, 4, 2, 1)
    assert block.shortcut is not None and block(torch.randn(1, 4, 8, 8)).shape == (1, 4, 4, 4)
    assert DRNBasicBlock(4, 8, 2, 1, residual=False).shortcut is None


def test_the_segmenter_upsamples_its_logits_bilinearly_to_the_input_size():
    """Bilinear, align_corners False: output column j reads the map at (j + 0.5) / 4 - 0.5, clamped to
    the map; a ramp 0..7 across an 8-wide map thus gives that coordinate itself at 32 pixels."""
    cfg = get_preset("tiny")
    seg = VAEUDANet(cfg).seg
    seg.stages, seg.head = torch.nn.Identity(), torch.nn.Identity()       # the logits are z itself
    z = torch.arange(8.0).expand(1, 5, 8, 8)
    out = seg(z)
    expected = ((torch.arange(32.0) + 0.5) / 4 - 0.5).clamp(0, 7)
    assert out.shape == (1, 5, 32, 32) and torch.allclose(out, expected.expand(1, 5, 32, 32))


def test_each_discriminator_scale_doubles_its_width_per_4x4_stride_2_layer():
    """UNIT's patch discriminator at the paper preset: per scale 4 layers of 4x4 stride-2 convolutions
    3 -> 64 -> 128 -> 256 -> 512 with leaky ReLU 0.2, then a 1x1 convolution to one score."""
    disc = MultiScaleDiscriminator(PRESETS["paper"])
    assert len(disc.scales) == 3
    for scale in disc.scales:
        convs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in scale if isinstance(m, torch.nn.Conv2d)]
        assert convs == [(3, 64, (4, 4), (2, 2)), (64, 128, (4, 4), (2, 2)), (128, 256, (4, 4), (2, 2)),
                         (256, 512, (4, 4), (2, 2)), (512, 1, (1, 1), (1, 1))]
        assert [m.negative_slope for m in scale if isinstance(m, torch.nn.LeakyReLU)] == [0.2] * 4


def test_the_second_discriminator_scale_sees_the_image_average_pooled_without_the_padding():
    """3x3 average, stride 2, padding 1 not counted: a ramp 0..7 across the image becomes 0.5 (columns
    0-1), 2 (1-3), 4 (3-5), 6 (5-7); the first scale sees the image itself."""
    disc = VAEUDANet(get_preset("tiny")).disc
    disc.scales = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])   # each scale returns what it sees
    x = torch.arange(8.0).expand(1, 3, 8, 8)
    first, second = disc(x)
    assert torch.equal(first, x)
    assert torch.allclose(second, torch.tensor([0.5, 2.0, 4.0, 6.0]).expand(1, 3, 4, 4))


def test_the_discriminator_size_check_agrees_with_the_discriminator():
    """nets._discriminator_fits says yes exactly for the sizes every scale of the network runs on
    (the tiny preset's 2 scales of 2 layers: 7 pixels pool to 4, which halves to 2 and 1; 6 pool to 3)."""
    from vaeuda.nets import _discriminator_fits
    cfg = get_preset("tiny")
    disc = MultiScaleDiscriminator(cfg)
    for size in range(1, 20):
        try:
            disc(torch.zeros(1, 3, size, size))
            runs = True
        except RuntimeError:
            runs = False
        assert _discriminator_fits(cfg, size) == runs == (size >= 7), size


def test_the_smallest_input_size_is_accepted_and_below_it_is_refused():
    """16 pixels (MIN_INPUT_SIZE) builds a tiny network that segments at 16 x 16; 12 is refused."""
    import dataclasses
    net = VAEUDANet(dataclasses.replace(get_preset("tiny"), input_size=16)).eval()
    with torch.no_grad():
        assert net.segment_logits(torch.randn(1, 3, 16, 16), "source").shape == (1, 5, 16, 16)
    with pytest.raises(VaeudaError, match=r"^input size 12 is too small: the networks need at least 16 pixels\.$"):
        VAEUDANet(dataclasses.replace(get_preset("tiny"), input_size=12))


def test_segment_logits_is_seg_of_the_posterior_mean_of_the_named_domain():
    """Inference reads mu (not logvar, not a sample) through E_S or E_T; E_T is made to differ from E_S."""
    torch.manual_seed(0)
    net = VAEUDANet(get_preset("tiny")).eval()
    with torch.no_grad():
        for p in net.enc_t.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 3, 32, 32)
        for domain in ("source", "target"):
            expected = net.seg(net.posterior(x, domain)[0])
            assert torch.equal(net.segment_logits(x, domain), expected)
        assert not torch.allclose(net.segment_logits(x, "source"), net.segment_logits(x, "target"))


def test_copy_source_to_target_copies_the_weights_not_the_modules():
    """E_T and D_T get E_S's and D_S's values and stay their own parameters afterwards."""
    torch.manual_seed(0)
    net = VAEUDANet(get_preset("tiny"))
    assert not torch.equal(net.enc_t.net[0][1].weight, net.enc_s.net[0][1].weight)    # two initialisations
    net.copy_source_to_target()
    for target, source in ((net.enc_t, net.enc_s), (net.dec_t, net.dec_s)):
        t, s = target.state_dict(), source.state_dict()
        assert list(t) == list(s) and all(torch.equal(t[k], s[k]) for k in t)
        with torch.no_grad():
            next(source.parameters()).add_(1.0)
        assert not torch.equal(next(target.parameters()), next(source.parameters()))


def test_the_cpu_preset_is_the_one_docs_method_describes():
    """64 x 64 input, width 16 so the latent is 64 x 16 x 16, 3x3 decoder upsampling convolutions,
    a 16-64 channel DRN without the stride, a 2-scale 3-layer discriminator."""
    cfg = PRESETS["cpu"]
    assert (cfg.input_size, cfg.base, cfg.latent_channels, cfg.latent_size) == (64, 16, 64, 16)
    assert cfg.dec_kernel == 3 and cfg.drn_strides == (1,) * 8
    assert cfg.drn_channels[0] == 16 and max(cfg.drn_channels) == 64
    assert (cfg.disc_scales, cfg.disc_layers) == (2, 3)


@pytest.mark.parametrize("field, value, message", [
    ("base", True, r"base must be a whole number in \[1, 1024\], not True"),           # bool is an int to Python
    ("n_down", 7, r"n_down must be a whole number in \[0, 6\], not 7"),
    ("input_size", 4097, r"input_size must be a whole number in \[16, 4096\], not 4097"),
    ("drn_layers", (1,) * 9, r"drn_layers must list the DRN's 8 stages, not \(1, 1, 1, 1, 1, 1, 1, 1, 1\)"),
    ("logvar_clamp", None, "logvar_clamp must be a positive number, not None"),     # only the field of view may be None
    ("logvar_clamp", 0.0, "logvar_clamp must be a positive number, not 0.0"),
    ("logvar_clamp", float("inf"), "logvar_clamp must be a positive number, not inf"),
    ("slice_fov_mm", 10000.5, r"slice_fov_mm must be in \[1.0, 10000.0\] mm, not 10000.5"),
])
def test_a_configuration_out_of_range_is_refused_in_one_sentence(field, value, message):
    import dataclasses
    cfg = dataclasses.replace(get_preset("tiny"), **{field: value})
    with pytest.raises(VaeudaError, match=f"^model configuration: {message}\\.$"):
        cfg.check()
    # the bounds themselves are allowed
    dataclasses.replace(get_preset("tiny"), n_down=6, input_size=4096, slice_fov_mm=None, logvar_clamp=1e-3).check()
