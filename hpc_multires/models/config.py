"""The model component's settings: which network, and its shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hpc_multires.errors import require

IMAGE_MODELS = ("unet", "resnet2d", "espcn")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The network. Input channels, sample shape and outputs come from the dataset."""

    name: Literal["cosmoflow", "neuron_inverter", "convnet2d", "unet", "resnet2d",
                  "espcn"] = "cosmoflow"
    """Architecture: cosmoflow (3D samples) or neuron_inverter (1D traces), regressing the
    labels (a scaled tanh output); convnet2d (2D images: conv blocks, then gap or flatten
    head, unbounded outputs: the class logits of task.kind = "classify");
    unet, resnet2d or espcn (2D images, for the image tasks of [task]): image to
    image, fully convolutional, one set of weights on every pyramid level."""
    width: float = 1.0
    """Width multiplier. cosmoflow: the first conv block has round(32 * width) filters,
    doubling per block; convnet2d: round(16 * width), doubling per block;
    neuron_inverter: each block has round(conv_channels[i] * width)."""
    depth: int = 5
    """cosmoflow, convnet2d: conv blocks, each halving every axis (with the flatten head the
    input side must be >= 2^depth; the gap head takes any size)."""
    kernel_size: int = 3
    """Convolution kernel size (odd for cosmoflow and for conv = "meshfree"; the shipped
    Neuron configs use 4, the reference network's)."""
    conv: Literal["standard", "meshfree"] = "standard"
    """The convolutions of the conv blocks. standard: torch's Conv1d/Conv3d; meshfree:
    mesh-free convolutions (docs/methods.md, "Mesh-free convolutions"), defined in physical
    coordinates: each layer's scale is (kernel_size - 1) / 4 spacings of its input at level
    0, and a stage runs it at its own level's spacing, so one set of weights computes the
    same operators on every level that resolves that scale and a model moves between levels
    by fusion without any kernel resampling. Needs an odd kernel_size; not with stem_level
    or kernel_level (which resample standard kernels across levels instead), nor with
    the 2D image networks (unet, resnet2d, espcn: standard only)."""
    conv_channels: tuple[int, ...] = (30, 90, 180)
    """neuron_inverter: filters of its conv blocks (scaled by width)."""
    pool: int = 4
    """neuron_inverter: pooling factor of each conv block (cosmoflow pools by 2)."""
    pool_type: Literal["max", "avg"] = "max"
    """Pooling of the conv blocks: max (the reference networks) or avg. Average pooling
    is linear, so with kernel_level a model moved between levels keeps what it computed
    far more closely (docs/design.md, "Moving between levels")."""
    norm: Literal["none", "batch"] = "none"
    """Normalisation after each convolution: none (the reference networks) or batch
    (BatchNorm: per batch and channel, so what sets one sample apart from the others, its
    amplitude included, survives; a per-sample norm would erase it)."""
    head: Literal["flatten", "gap"] = "flatten"
    """flatten: dense layers on the flattened features (original); gap: global average pool."""
    fc_sizes: tuple[int, ...] = (128, 64)
    """Hidden dense layer sizes."""
    dropout: float = 0.0
    """Dropout probability before each hidden dense layer."""
    coarse_pools: Literal["keep", "drop"] = "keep"
    """How the network runs on a coarse level L. keep: unchanged, so every layer sees
    features 2^L times smaller than at level 0 (cheapest, but weights moved to level 0
    then measure the wrong scales); drop: the first poolings are reduced by 2^L in all, so
    every later layer sees the same scale and map size as at level 0 and weights carry
    over between levels unchanged (see docs/design.md, "Moving between levels")."""
    stem_level: int = 0
    """Mesh-free first convolution (0: off). Its kernel is defined on the grid of pyramid
    level R = stem_level: on a finer level L it is sampled at that level's spacing (2^(R-L)
    times the taps per axis) and applied with stride 2^(R-L), so the first block's output
    lies on the level-R grid whatever the input level, and `prolong` moves a level-R model
    to level L without changing what it computes. The first block(s) pool 2^R less, which
    keeps the later map sizes of the plain network. Levels coarser than R run the stem
    unstrided. Train the baseline with the same setting to compare like with like."""
    stem_detail: bool = False
    """With stem_level: on levels finer than stem_level, add a full-resolution branch beside
    the strided stem (a convolution at the level's own spacing, max-pooled onto the stem's
    grid) whose per-channel gate starts at 0. A model prolonged from a coarse level starts
    out computing what the coarse model did and learns from there what only the fine level
    shows."""
    kernel_level: int = 0
    """Level-consistent network (0: off). Kernels and pooling windows are given on the
    grid of pyramid level R = kernel_level. On a finer level L, with f = 2^(R-L), the
    first convolution has f times the taps per axis, the later ones are dilated by f, and
    each pooling window spans f * (pool - 1) + 1 points at the unchanged stride: every map
    keeps its level's size (a level costs what its samples hold), and a level-R model moved
    to level L by `prolong` computes at every f-th map point what it computed on level R,
    up to the points in between that the wider pooling windows also read. Levels R and
    coarser run the plain network. Train the baseline with the same setting to compare
    like with like."""

    unet_base_channels: int = 32
    """unet: channels of the first encoder stage."""
    unet_multipliers: tuple[int, ...] = (1, 2, 4)
    """unet: channels of each encoder stage as multiples of unet_base_channels; the image is
    halved between stages, so every level's sides must be divisible by 2^(stages - 1)."""
    resnet_channels: int = 128
    """resnet2d: feature maps of its residual blocks."""
    resnet_blocks: int = 2
    """resnet2d: residual blocks (each two 3x3 convolutions)."""
    espcn_channels: tuple[int, ...] = (64, 32)
    """espcn: the two hidden widths (it upscales by 2: task.sr_input = "half")."""
    residual: bool = True
    """unet, resnet2d: add the input image to the network's output, so it learns the
    correction of its input (a restoration starts from "change nothing"); false: it
    predicts the clean image itself."""

    @property
    def image_to_image(self) -> bool:
        """The network maps an image to an image (the image tasks), not to labels."""
        return self.name in IMAGE_MODELS

    def check(self) -> None:
        """Raise ConfigError naming the key and the fix for a value that cannot work."""
        m = self
        require(m.width > 0, "model.width", m.width,
                "use a positive multiplier such as 0.25 or 1")
        require(m.depth >= 1, "model.depth", m.depth, "use 1 or more conv blocks")
        require(m.kernel_size >= 1, "model.kernel_size", m.kernel_size, "use a size such as 3")
        require(m.pool >= 1, "model.pool", m.pool, "use a pooling factor such as 4")
        require(len(m.conv_channels) >= 1 and all(c >= 1 for c in m.conv_channels),
                "model.conv_channels", m.conv_channels,
                "use positive filter counts, e.g. [30, 90, 180]")
        require(all(s >= 1 for s in m.fc_sizes), "model.fc_sizes", m.fc_sizes,
                "use positive layer sizes, e.g. [128, 64]")
        require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout,
                "use a probability in [0, 1)")
        require(0 <= m.stem_level <= 4, "model.stem_level", m.stem_level,
                "use 0 (off) or the pyramid level the first convolution is defined on, e.g. 1")
        require(m.stem_level > 0 or not m.stem_detail, "model.stem_detail", m.stem_detail,
                "set model.stem_level (the branch sits beside a strided stem) or leave it false")
        require(m.stem_level == 0 or m.coarse_pools == "keep", "model.stem_level",
                m.stem_level,
                "use either model.stem_level or model.coarse_pools = 'drop', not both: each "
                "sets how the first blocks pool")
        require(0 <= m.kernel_level <= 4, "model.kernel_level", m.kernel_level,
                "use 0 (off) or the pyramid level the kernels are defined on, e.g. 1")
        require(m.kernel_level == 0 or (m.stem_level == 0 and m.coarse_pools == "keep"),
                "model.kernel_level", m.kernel_level,
                "use model.kernel_level alone: model.stem_level and model.coarse_pools = "
                "'drop' change the same layers in another way")
        require(m.unet_base_channels >= 1, "model.unet_base_channels", m.unet_base_channels,
                "use 1 or more, e.g. 32")
        require(len(m.unet_multipliers) >= 1 and min(m.unet_multipliers) >= 1,
                "model.unet_multipliers", m.unet_multipliers,
                "use one or more positive multiples, e.g. [1, 2, 4]")
        require(m.resnet_channels >= 1, "model.resnet_channels", m.resnet_channels,
                "use 1 or more, e.g. 64")
        require(m.resnet_blocks >= 0, "model.resnet_blocks", m.resnet_blocks, "use 0 or more")
        require(len(m.espcn_channels) == 2 and min(m.espcn_channels) >= 1,
                "model.espcn_channels", m.espcn_channels, "give the two hidden widths, e.g. "
                "[64, 32]")
        if m.name == "convnet2d":
            for key, value, ok in (("conv", m.conv, m.conv == "standard"),
                                   ("stem_level", m.stem_level, m.stem_level == 0),
                                   ("kernel_level", m.kernel_level, m.kernel_level == 0)):
                require(ok, f"model.{key}", value,
                        "model.name = 'convnet2d' has plain convolutions only: leave "
                        f"model.{key} at its default")
        require(not (m.image_to_image and m.conv == "meshfree"), "model.conv", m.conv,
                f"model.name = {m.name!r} (a 2D image network) has standard convolutions "
                "only: use model.conv = 'standard'")
        if m.conv == "meshfree":
            require(m.kernel_size % 2 == 1, "model.kernel_size", m.kernel_size,
                    "a mesh-free convolution (model.conv = 'meshfree') is centred: use an odd "
                    f"size such as {m.kernel_size - 1} or {m.kernel_size + 1}")
            require(m.stem_level == 0, "model.stem_level", m.stem_level,
                    "use 0 with model.conv = 'meshfree': its layers already run at every "
                    "level's spacing, a strided stem defined on a coarse grid is undefined")
            require(m.kernel_level == 0, "model.kernel_level", m.kernel_level,
                    "use 0 with model.conv = 'meshfree': its layers already run at every "
                    "level's spacing, dilated kernels of a coarse grid are undefined")
