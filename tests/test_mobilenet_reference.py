"""The reference MobileNet V1 reproduces the paper's parameter and mult-add counts
(arXiv 1704.04861)."""

import pytest

from mobilenet.reference import DepSepConv, MobileNet, mult_adds

PAPER = [  # alpha, parameters (millions), mult-adds at 224 (millions)
    (1.0, 4.2, 569),
    (0.75, 2.6, 325),
    (0.5, 1.3, 149),
    (0.25, 0.5, 41),
]


@pytest.mark.parametrize("alpha,params_m,mult_adds_m", PAPER)
def test_paper_counts(alpha, params_m, mult_adds_m):
    model = MobileNet(alpha)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 1) == params_m
    assert round(mult_adds(model) / 1e6) == pytest.approx(mult_adds_m, abs=1)


@pytest.mark.parametrize("resolution,mult_adds_m", [(224, 569), (192, 418), (160, 290), (128, 186)])
def test_resolution_multiplier(resolution, mult_adds_m):
    assert round(mult_adds(MobileNet(1.0), resolution) / 1e6) == pytest.approx(mult_adds_m, abs=1)


def test_block_state_dict_keys():
    keys = set(DepSepConv(8, 16).state_dict())
    for half in ("depthwise", "pointwise"):
        assert f"{half}.0.weight" in keys
        for stat in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert f"{half}.1.{stat}" in keys
