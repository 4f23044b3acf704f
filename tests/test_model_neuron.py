"""Neuron Inverter 1D CNN: shapes, output range, parameter count, length checks, the GAP head."""

from __future__ import annotations

import pytest
import torch

from hpc_multires.errors import ConfigError
from hpc_multires.models import build_model
from hpc_multires.models.neuron_inverter import NeuronInverter
from hpc_multires.plan.config import ModelConfig


def test_reference_size_model() -> None:
    # 4 probes x 1,600 bins, conv 30 -> 90 -> 180 (kernel 4, pool 4: 1600 -> 25 bins), dense
    # 4,500 -> 512 -> 256 -> 128 -> 6: 2,545,890 parameters, 2.3 M of them in the first
    # dense layer.
    m = NeuronInverter(in_channels=4, length=1600, num_outputs=6)
    assert sum(p.numel() for p in m.parameters()) == 2_545_890


def test_output_shape_and_range() -> None:
    torch.manual_seed(0)
    m = NeuronInverter(in_channels=4, length=1600, num_outputs=6)
    # Raw millivolts are far from unit scale; the output must still stay in (-1.2, 1.2).
    out = m(torch.randn(3, 4, 1600) * 60.0 - 60.0)
    assert out.shape == (3, 6)
    assert out.abs().max() <= 1.2
    assert out.std() > 0  # not a constant (e.g. a dead head)


def test_width_scales_the_conv_channels() -> None:
    m = NeuronInverter(in_channels=4, length=1600, num_outputs=6, width=0.5)
    convs = [layer for layer in m.features if isinstance(layer, torch.nn.Conv1d)]
    assert [c.out_channels for c in convs] == [15, 45, 90]
    tiny = NeuronInverter(in_channels=4, length=1600, num_outputs=6, width=0.001)
    assert all(c.out_channels == 1 for c in tiny.features if isinstance(c, torch.nn.Conv1d))


def test_too_short_for_the_pooling() -> None:
    # 3 blocks of pool 4 need 64 bins; 50 (e.g. 1,600 bins downsampled 32x) is too short.
    with pytest.raises(ConfigError, match=r"at least 64 bins.*at most 2 conv blocks"):
        NeuronInverter(in_channels=4, length=50, num_outputs=6)
    # The smallest valid length works.
    m = NeuronInverter(in_channels=4, length=64, num_outputs=6)
    assert m(torch.randn(2, 4, 64)).shape == (2, 6)


def test_gap_head_works_for_other_lengths() -> None:
    m = NeuronInverter(in_channels=4, length=400, num_outputs=6, head="gap", width=0.5,
                       dropout=0.1)
    m.eval()
    for length in (400, 1600, 100):
        out = m(torch.randn(2, 4, length))
        assert out.shape == (2, 6) and out.abs().max() <= 1.2
    # The flatten head is sized for one length and cannot take another.
    flat = NeuronInverter(in_channels=4, length=400, num_outputs=6)
    with pytest.raises(RuntimeError):
        flat(torch.randn(2, 4, 1600))


def test_too_short_names_the_poolings_it_has() -> None:
    """The advice counts the blocks' real poolings: at level 2 with model.stem_level = 1
    they pool by 2, 4, 4 (32 in all, not 4^3 = 64)."""
    import dataclasses

    from hpc_multires.models import build_model
    from hpc_multires.plan.config import ModelConfig

    cfg = dataclasses.replace(ModelConfig(name="neuron_inverter", fc_sizes=(4,)), stem_level=1)
    with pytest.raises(ConfigError, match=r"by 32 in all.*at least 32 bins.*at most 2 conv"):
        build_model(cfg, (4, 20), 2, level=2)


def test_too_short_without_pooling_is_an_error_not_a_hang() -> None:
    import threading

    raised: list[BaseException] = []

    def build() -> None:
        try:
            NeuronInverter(in_channels=1, length=3, num_outputs=1, conv_channels=(4, 4), pool=1,
                           pools=[1, 1], stem_stride=4)
        except ConfigError as e:
            raised.append(e)

    worker = threading.Thread(target=build, daemon=True)  # a hang must not hold pytest
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the length check loops forever for pool = 1"
    assert raised and "at least 4 bins" in str(raised[0])


def test_batch_norm_after_every_convolution() -> None:
    cfg = ModelConfig(name="neuron_inverter", width=0.25, norm="batch")
    model = build_model(cfg, (4, 1600), 6)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == len(cfg.conv_channels)
    model.train()
    assert model(torch.randn(3, 4, 1600)).shape == (3, 6)
