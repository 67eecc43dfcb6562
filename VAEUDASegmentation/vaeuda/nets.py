"""The networks of Ouyang et al. (MICCAI 2019): a two-domain VAE with a shared latent space,
a multi-scale patch discriminator, and a DRN-C-26 segmenter operating on the latent map.

Shapes follow UNIT (Liu et al. 2017) and one-shot translation (Benaim & Wolf 2018, the
paper's [2]): a 7x7 convolution, ``n_down`` stride-2 convolutions and residual blocks with
instance normalisation. For the ``paper`` preset a ``3 x 256 x 256`` image becomes a
``256 x 64 x 64`` latent map.

Who is who (the paper's notation)::

    E_S, E_T   DomainEncoder   x (B, in_ch, H, W)      -> h (B, C, H/4, W/4)     domain specific
    E_Z        SharedEncoder   h                        -> mu, logvar (B, C, H/4, W/4)
    D_Z        SharedDecoder   z (B, C, H/4, W/4)       -> h (B, C, H/4, W/4)
    D_S, D_T   DomainDecoder   h                        -> x (B, in_ch, H, W)     domain specific
    Seg        DRNSegmenter    z                        -> logits (B, n_classes, H, W)
    Disc       MultiScaleDiscriminator  x               -> list of patch score maps

(H/4: the latent is H / 2**n_down, and every preset has n_down = 2.)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .choices import PRESET_NAMES, check_choice
from .errors import VaeudaError


@dataclass
class NetConfig:
    """Every architectural choice; stored in each model file so it can be rebuilt exactly."""
    input_size: int = 256            # S: model input is (3, S, S)
    in_channels: int = 3             # the coronal slice and its two neighbours
    slice_fov_mm: Optional[float] = 192.0   # square field of view of a slice, centred on the volume (None: whole extent)
    n_classes: int = 5               # background + 4 structures
    base: int = 64                   # width of the first encoder convolution; latent has base * 2**n_down
    n_down: int = 2                  # stride-2 convolutions in the encoder (latent is S / 2**n_down)
    n_res_domain: int = 1            # residual blocks in E_S/E_T and in D_S/D_T
    n_res_shared: int = 1            # residual blocks in the trunk of E_Z (before the mu/logvar branches)
    n_res_branch: int = 2            # the last blocks of E_Z, one copy for mu and one for logvar
    n_res_dec_shared: int = 2        # residual blocks in D_Z
    dec_kernel: int = 5              # kernel of the upsampling convolutions in D_S/D_T (UNIT: 5)
    drn_channels: Tuple[int, ...] = (16, 32, 64, 128, 256, 512, 512, 512)
    drn_layers: Tuple[int, ...] = (1, 1, 2, 2, 2, 2, 1, 1)
    drn_strides: Tuple[int, ...] = (1, 1, 1, 2, 1, 1, 1, 1)   # the latent is already /4: one more stride gives DRN's output stride 8
    drn_dilations: Tuple[int, ...] = (1, 1, 1, 1, 2, 4, 2, 1)
    disc_base: int = 64
    disc_layers: int = 4
    disc_scales: int = 3
    logvar_clamp: float = 8.0        # |log sigma^2| bound, keeps exp() finite early in training

    @property
    def latent_channels(self) -> int:
        return self.base * 2 ** self.n_down

    @property
    def latent_size(self) -> int:
        return self.input_size // 2 ** self.n_down

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise VaeudaError(f"model configuration has unknown fields {sorted(unknown)}; it was written by a newer engine.")
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        cfg.check()
        return cfg

    def check(self) -> None:
        """Refuse values no network of this engine has (an edited model file): whole numbers in
        range, the DRN's eight stages, a finite positive field of view and log-variance bound.
        The bounds are far beyond the presets, and keep a damaged file from allocating without end."""
        def whole(name, value, low, high):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise VaeudaError(f"model configuration: {name} must be a whole number in [{low}, {high}], not {value!r}.")

        for name, low, high in (("input_size", MIN_INPUT_SIZE, 4096), ("in_channels", 3, 3), ("n_classes", 5, 5),
                                ("base", 1, 1024), ("n_down", 0, 6), ("n_res_domain", 0, 32), ("n_res_shared", 0, 32),
                                ("n_res_branch", 0, 32), ("n_res_dec_shared", 0, 32), ("dec_kernel", 1, 15),
                                ("disc_base", 1, 1024), ("disc_layers", 1, 8), ("disc_scales", 1, 6)):
            whole(name, getattr(self, name), low, high)
        for name, low, high in (("drn_channels", 1, 4096), ("drn_layers", 1, 16), ("drn_strides", 1, 2),
                                ("drn_dilations", 1, 16)):
            values = getattr(self, name)
            if not isinstance(values, tuple) or len(values) != 8:
                raise VaeudaError(f"model configuration: {name} must list the DRN's 8 stages, not {values!r}.")
            for value in values:
                whole(name, value, low, high)
        for name in ("slice_fov_mm", "logvar_clamp"):
            value = getattr(self, name)
            if name == "slice_fov_mm" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise VaeudaError(f"model configuration: {name} must be a positive number, not {value!r}.")
        # a slice a fraction of a millimetre wide is no field of view (1e-300 made ITK's resampler fail)
        if self.slice_fov_mm is not None and not MIN_FOV_MM <= self.slice_fov_mm <= MAX_FOV_MM:
            raise VaeudaError(f"model configuration: slice_fov_mm must be in [{MIN_FOV_MM}, {MAX_FOV_MM}] mm, "
                              f"not {self.slice_fov_mm!r}.")


PRESETS: Dict[str, NetConfig] = {
    # As the paper: 3 x 256 x 256 slices, UNIT widths, DRN-C-26 widths.
    "paper": NetConfig(),
    # Small enough that `make demo` trains, adapts and evaluates in minutes on 2 CPU cores.
    "cpu": NetConfig(input_size=64, base=16, dec_kernel=3, disc_base=16, disc_layers=3, disc_scales=2,
                     drn_channels=(16, 16, 32, 32, 64, 64, 64, 64),
                     drn_strides=(1, 1, 1, 1, 1, 1, 1, 1)),
    # For tests only: seconds per run.
    "tiny": NetConfig(input_size=32, base=4, n_res_dec_shared=1, dec_kernel=3, disc_base=4, disc_layers=2, disc_scales=2,
                      drn_channels=(4, 4, 8, 8, 8, 8, 8, 8), drn_strides=(1, 1, 1, 1, 1, 1, 1, 1)),
}


# A floor: the latent is S / 2**n_down (S/4 in every preset), and the discriminator halves S again
# per scale and per layer.
MIN_INPUT_SIZE = 16
# Bounds of a slice's field of view a model file may hold (the presets: 192 mm), in mm.
MIN_FOV_MM, MAX_FOV_MM = 1.0, 10000.0


def get_preset(name: str) -> NetConfig:
    check_choice("--preset", name, PRESET_NAMES)
    return dataclasses.replace(PRESETS[name])


def _conv_block(cin: int, cout: int, k: int, stride: int = 1, norm: bool = True, act: bool = True) -> nn.Sequential:
    """Reflect-padded convolution, optional instance norm and ReLU (UNIT's Conv2dBlock)."""
    layers: List[nn.Module] = [nn.ReflectionPad2d((k - 1) // 2), nn.Conv2d(cin, cout, k, stride, bias=not norm)]
    if norm:
        layers.append(nn.InstanceNorm2d(cout, affine=True))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with instance norm and an identity skip. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_block(channels, channels, 3), _conv_block(channels, channels, 3, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DomainEncoder(nn.Module):
    """E_S or E_T: (B, in_ch, S, S) -> (B, C, S/2**n_down, S/2**n_down), C = base * 2**n_down."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        layers: List[nn.Module] = [_conv_block(cfg.in_channels, cfg.base, 7)]
        ch = cfg.base
        for _ in range(cfg.n_down):
            layers.append(_conv_block(ch, ch * 2, 4, stride=2))
            ch *= 2
        layers += [ResBlock(ch) for _ in range(cfg.n_res_domain)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SharedEncoder(nn.Module):
    """E_Z: h (B, C, s, s) -> (mu, logvar), each (B, C, s, s).

    The posterior covariance is predicted, not fixed to identity: the last ``n_res_branch``
    blocks are duplicated into a mean branch and a log-variance branch, each closed by a 1x1
    convolution without normalisation (mu is unbounded; logvar is clamped to +-``logvar_clamp``).
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        ch = cfg.latent_channels
        self.trunk = nn.Sequential(*[ResBlock(ch) for _ in range(cfg.n_res_shared)])

        def branch() -> nn.Sequential:
            return nn.Sequential(*[ResBlock(ch) for _ in range(cfg.n_res_branch - 1)], nn.Conv2d(ch, ch, 1))

        self.mu = branch()
        self.logvar = branch()
        self.logvar_clamp = cfg.logvar_clamp

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        t = self.trunk(h)
        return self.mu(t), self.logvar(t).clamp(-self.logvar_clamp, self.logvar_clamp)


class SharedDecoder(nn.Module):
    """D_Z: z (B, C, s, s) -> h (B, C, s, s)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.net = nn.Sequential(*[ResBlock(cfg.latent_channels) for _ in range(cfg.n_res_dec_shared)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class DomainDecoder(nn.Module):
    """D_S or D_T: h (B, C, s, s) -> image (B, in_ch, S, S).

    Upsampling is nearest-neighbour x2 then a 5x5 convolution (UNIT; 3x3 in the ``cpu`` and ``tiny``
    presets, which halves the decoder's cost), which avoids the
    checkerboard of transposed convolutions. The output is linear: images are z-scored, not in [-1, 1].
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        ch = cfg.latent_channels
        layers: List[nn.Module] = [ResBlock(ch) for _ in range(cfg.n_res_domain)]
        for _ in range(cfg.n_down):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv_block(ch, ch // 2, cfg.dec_kernel)]
            ch //= 2
        layers.append(_conv_block(ch, cfg.in_channels, 7, norm=False, act=False))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class DRNBasicBlock(nn.Module):
    """DRN's basic block: two dilated 3x3 convolutions with batch norm (Yu et al. 2017), with a
    residual connection unless ``residual`` is False (DRN-C's last two stages)."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int, residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.residual = residual
        self.shortcut = None
        if residual and (stride != 1 or cin != cout):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out, inplace=True)


def _drn_stage(cin: int, cout: int, n: int, stride: int, dilation: int, residual: bool) -> nn.Sequential:
    """n DRN basic blocks (two 3x3 convolutions each); the first one changes the width and strides."""
    return nn.Sequential(*[DRNBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dilation, residual)
                           for i in range(n)])


class DRNSegmenter(nn.Module):
    """Seg: DRN-C-26 on the latent map. z (B, C_latent, s, s) -> logits (B, n_classes, S, S).

    DRN-C-26 (Yu, Koltun, Funkhouser 2017; fyu/drn ``drn_c_26``): a 7x7 convolution, then eight
    stages of basic blocks (two 3x3 convolutions each) with channels (16, 32, 64, 128, 256, 512,
    512, 512) and depths (1, 1, 2, 2, 2, 2, 1, 1); stages 1-6 are residual, stages 7-8 are not
    (which removes gridding artefacts); dilations 2 and 4 in stages 5-6, then 2 and 1: 1 + 24 + 1
    weight layers with the head. Changes for this use, as the paper's "modifications on the
    front and the end": the 7x7 convolution takes the latent map instead of an RGB image, and
    since the latent is already at 1/4 resolution only one stage keeps a stride
    (``drn_strides``); the head is a 1x1 convolution to the classes followed by bilinear
    upsampling to the input size.
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        ch, n, st, dil = cfg.drn_channels, cfg.drn_layers, cfg.drn_strides, cfg.drn_dilations
        stages: List[nn.Module] = [nn.Sequential(
            nn.Conv2d(cfg.latent_channels, ch[0], 7, st[0], padding=3, bias=False),
            nn.BatchNorm2d(ch[0]), nn.ReLU(inplace=True))]
        for i in range(8):                                  # stage i + 1; its stride is st[i], stage 1's is 1
            stages.append(_drn_stage(ch[max(i - 1, 0)], ch[i], n[i], st[i] if i else 1, dil[i], residual=i < 6))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(ch[7], cfg.n_classes, 1)
        self.output_size = cfg.input_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.stages(z))
        return F.interpolate(logits, size=(self.output_size, self.output_size), mode="bilinear", align_corners=False)


class MultiScaleDiscriminator(nn.Module):
    """Disc: UNIT's multi-scale patch discriminator on source-image space.

    x (B, in_ch, S, S) -> list of ``disc_scales`` score maps (B, 1, h_k, w_k); scale k sees the
    image average-pooled k times. Each scale: ``disc_layers`` 4x4 stride-2 convolutions with
    leaky ReLU (no normalisation), then a 1x1 convolution to one score per patch.
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.scales = nn.ModuleList()
        for _ in range(cfg.disc_scales):
            layers: List[nn.Module] = []
            cin, cout = cfg.in_channels, cfg.disc_base
            for _ in range(cfg.disc_layers):
                layers += [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 4, 2), nn.LeakyReLU(0.2, inplace=True)]
                cin, cout = cout, cout * 2
            layers.append(nn.Conv2d(cin, 1, 1))
            self.scales.append(nn.Sequential(*layers))
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outputs = []
        for i, net in enumerate(self.scales):
            if i:
                x = self.downsample(x)
            outputs.append(net(x))
        return outputs


def _discriminator_fits(cfg: NetConfig, size: int) -> bool:
    """Whether every scale of :class:`MultiScaleDiscriminator` can run on ``size x size`` images:
    each of its stride-2 layers reflect-pads by 1, which needs at least 2 pixels."""
    for scale in range(cfg.disc_scales):
        s = size
        for _ in range(scale):
            s = (s + 1) // 2                    # AvgPool2d(3, stride 2, padding 1)
        for _ in range(cfg.disc_layers):
            if s < 2:
                return False
            s //= 2                             # pad 1, 4x4 convolution, stride 2
    return True




class VAEUDANet(nn.Module):
    """All networks of the method, as named submodules so gradients can be routed by name.

    ``enc_s, enc_t, enc_z, dec_z, dec_s, dec_t, seg, disc`` are E_S, E_T, E_Z, D_Z, D_S, D_T,
    Seg and Disc of the paper.
    """

    MODULES = ("enc_s", "enc_t", "enc_z", "dec_z", "dec_s", "dec_t", "seg", "disc")

    def __init__(self, cfg: NetConfig):
        super().__init__()
        if cfg.input_size < MIN_INPUT_SIZE:
            raise VaeudaError(f"input size {cfg.input_size} is too small: the networks need at least "
                              f"{MIN_INPUT_SIZE} pixels.")
        if cfg.input_size % (2 ** cfg.n_down):
            raise VaeudaError(f"input size {cfg.input_size} is not divisible by {2 ** cfg.n_down}.")
        if not _discriminator_fits(cfg, cfg.input_size):
            smallest = next(s for s in range(MIN_INPUT_SIZE, 1 << 16, 2 ** cfg.n_down) if _discriminator_fits(cfg, s))
            raise VaeudaError(f"input size {cfg.input_size} is too small for the {cfg.disc_scales}-scale, "
                              f"{cfg.disc_layers}-layer discriminator of this preset: it needs at least {smallest} pixels.")
        self.cfg = cfg
        self.enc_s, self.enc_t = DomainEncoder(cfg), DomainEncoder(cfg)
        self.enc_z = SharedEncoder(cfg)
        self.dec_z = SharedDecoder(cfg)
        self.dec_s, self.dec_t = DomainDecoder(cfg), DomainDecoder(cfg)
        self.seg = DRNSegmenter(cfg)
        self.disc = MultiScaleDiscriminator(cfg)

    def posterior(self, x: torch.Tensor, domain: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """q(Z|x): x (B, in_ch, S, S) -> mu, logvar (B, C, s, s), through E_S or E_T then E_Z."""
        enc = self.enc_s if domain == "source" else self.enc_t
        return self.enc_z(enc(x))

    def decode(self, z: torch.Tensor, domain: str) -> torch.Tensor:
        """z (B, C, s, s) -> image (B, in_ch, S, S) in the given domain, through D_Z then D_S or D_T."""
        dec = self.dec_s if domain == "source" else self.dec_t
        return dec(self.dec_z(z))

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor, generator: "torch.Generator | None" = None) -> torch.Tensor:
        """Re-parameterisation: z = mu + sigma * eps, eps ~ N(0, I).

        eps is drawn on the CPU from ``generator`` and moved to mu's device, so one seeded CPU
        generator gives the same draws whatever device trains.
        """
        eps = torch.randn(mu.shape, generator=generator, dtype=torch.float32).to(mu.device, mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def segment_logits(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        """Inference: x (B, in_ch, S, S) -> logits (B, n_classes, S, S), Seg applied to the posterior mean."""
        mu, _ = self.posterior(x, domain)
        return self.seg(mu)

    def copy_source_to_target(self) -> None:
        """Initialise E_T, D_T from E_S, D_S before adaptation (as one-shot translation [2] does)."""
        self.enc_t.load_state_dict(self.enc_s.state_dict())
        self.dec_t.load_state_dict(self.dec_s.state_dict())
