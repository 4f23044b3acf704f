"""Resolution-aware network architectures; no training code here."""

from __future__ import annotations

from torch import nn

from hpc_multires.errors import ConfigError
from hpc_multires.models.config import ModelConfig
from hpc_multires.models.conv import CONV_KINDS, conv_layer
from hpc_multires.models.convnet2d import ConvNet2d
from hpc_multires.models.cosmoflow import CosmoFlow
from hpc_multires.models.espcn import ESPCN
from hpc_multires.models.meshfree import level_spacing, set_spacing
from hpc_multires.models.neuron_inverter import NeuronInverter
from hpc_multires.models.resnet2d import ResNet2d
from hpc_multires.models.scale import block_pools, grid_factor
from hpc_multires.models.unet import UNet


def build_model(cfg: ModelConfig, sample_shape: tuple[int, ...], num_outputs: int,
                level: int = 0) -> nn.Module:
    """The network named by `cfg`, sized for samples of `sample_shape` (C, *spatial) at
    pyramid `level` (which sets the poolings when cfg.coarse_pools is "drop", the first
    convolution's stride when cfg.stem_level is set, the kernels and pooling windows
    when cfg.kernel_level is set, and the grid spacing mesh-free convolutions run at).
    The image-to-image networks (unet, resnet2d, espcn) give as many channels as they
    take, and ignore `num_outputs` (the labels); they take standard convolutions only."""
    model = _build(cfg, sample_shape, num_outputs, level)
    if cfg.conv == "meshfree":
        set_spacing(model, level_spacing(level))  # the layers' scales stay those of level 0
    return model


def _build(cfg: ModelConfig, sample_shape: tuple[int, ...], num_outputs: int,
           level: int) -> nn.Module:
    if cfg.image_to_image:
        return _image_model(cfg, sample_shape)
    stride = grid_factor(level, cfg.stem_level)
    factor = grid_factor(level, cfg.kernel_level)
    if cfg.name == "cosmoflow":
        _require_dims(cfg.name, sample_shape, 3, "3D samples (C, D, H, W) (single-channel "
                      "volumes need their channel axis: convert x[:, None])")
        return CosmoFlow(
            in_channels=sample_shape[0], spatial=sample_shape[1:], num_outputs=num_outputs,
            width=cfg.width, depth=cfg.depth, kernel_size=cfg.kernel_size, head=cfg.head,
            fc_sizes=cfg.fc_sizes, dropout=cfg.dropout,
            pools=block_pools(2, cfg.depth, level, cfg.coarse_pools, cfg.stem_level),
            stem_stride=stride, stem_detail=cfg.stem_detail, pool_type=cfg.pool_type,
            grid_factor=factor, norm=cfg.norm, conv=cfg.conv)
    if cfg.name == "neuron_inverter":
        _require_dims(cfg.name, sample_shape, 1, "1D traces (C, T)")
        return NeuronInverter(
            in_channels=sample_shape[0], length=sample_shape[1], num_outputs=num_outputs,
            width=cfg.width, conv_channels=cfg.conv_channels, kernel_size=cfg.kernel_size,
            pool=cfg.pool, fc_sizes=cfg.fc_sizes, dropout=cfg.dropout, head=cfg.head,
            pools=block_pools(cfg.pool, len(cfg.conv_channels), level, cfg.coarse_pools,
                              cfg.stem_level),
            stem_stride=stride, stem_detail=cfg.stem_detail, pool_type=cfg.pool_type,
            grid_factor=factor, norm=cfg.norm, conv=cfg.conv)
    if cfg.name == "convnet2d":
        _require_dims(cfg.name, sample_shape, 2, "2D images (C, H, W)")
        return ConvNet2d(
            in_channels=sample_shape[0], spatial=sample_shape[1:], num_outputs=num_outputs,
            width=cfg.width, depth=cfg.depth, kernel_size=cfg.kernel_size, head=cfg.head,
            fc_sizes=cfg.fc_sizes, dropout=cfg.dropout,
            pools=block_pools(2, cfg.depth, level, cfg.coarse_pools),
            pool_type=cfg.pool_type, norm=cfg.norm)
    raise ConfigError(f"unknown model.name {cfg.name!r}")


def _require_dims(name: str, sample_shape: tuple[int, ...], spatial: int, takes: str) -> None:
    """Refuse samples without one channel axis and `spatial` spatial axes: model `name`
    takes `takes`."""
    if len(sample_shape) != spatial + 1:
        raise ConfigError(f"model.name = {name!r} takes {takes}; the dataset's samples have "
                          f"shape {sample_shape}")


def _image_model(cfg: ModelConfig, sample_shape: tuple[int, ...]) -> nn.Module:
    """A 2D image-to-image network for images of `sample_shape` (C, H, W); a UNet deeper
    than their sides allow is a ConfigError naming how many multipliers fit."""
    _require_dims(cfg.name, sample_shape, 2, "2D images (C, H, W)")
    channels = sample_shape[0]
    if cfg.name == "unet":
        try:
            return UNet(in_channels=channels, base_channels=cfg.unet_base_channels,
                        multipliers=cfg.unet_multipliers, spatial=sample_shape[1:],
                        residual=cfg.residual)
        except ConfigError as e:  # name the keys the user sets
            raise ConfigError(f"model.unet_multipliers = {list(cfg.unet_multipliers)}: {e}"
                              .replace("multipliers (e.g.", "multipliers (model.unet_multipliers"
                                       " =")) from None
    if cfg.name == "resnet2d":
        return ResNet2d(in_channels=channels, channels=cfg.resnet_channels,
                        blocks=cfg.resnet_blocks, residual=cfg.residual)
    return ESPCN(in_channels=channels, channels=cfg.espcn_channels)


__all__ = ["CONV_KINDS", "ESPCN", "ConvNet2d", "CosmoFlow", "NeuronInverter", "ResNet2d", "UNet",
           "build_model", "conv_layer"]
