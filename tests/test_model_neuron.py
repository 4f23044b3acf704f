"""Neuron Inverter 1D CNN: shapes, output range, parameter count, length checks, the GAP head."""

from __future__ import annotations

import pytest
import torch

from hpc_multires.errors import ConfigError
from hpc_multires.models.neuron_inverter import NeuronInverter


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
