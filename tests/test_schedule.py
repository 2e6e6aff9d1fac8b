"""Learning-rate schedule values at given iterations, checked against the official rules written out here."""

import math

import pytest

from wmse.schedule import default_drop_epochs, lr_factor


def test_warmup_is_linear_over_500_iterations():
    assert lr_factor(0, 100, 1000) == pytest.approx(1 / 500)
    assert lr_factor(249, 100, 1000) == pytest.approx(250 / 500)
    assert lr_factor(499, 100, 1000) == pytest.approx(1.0)
    assert lr_factor(500, 100, 1000) == 1.0


def test_step_drops_at_e_minus_50_and_e_minus_25():
    spe, E = 97, 1000
    assert default_drop_epochs(E) == (950, 975)
    assert lr_factor(949 * spe + spe - 1, spe, E) == 1.0
    assert lr_factor(950 * spe, spe, E) == pytest.approx(0.2)
    assert lr_factor(974 * spe + 5, spe, E) == pytest.approx(0.2)
    assert lr_factor(975 * spe, spe, E) == pytest.approx(0.04)
    assert lr_factor(999 * spe, spe, E) == pytest.approx(0.04)
    assert default_drop_epochs(30) == (0, 5)


def test_cosine_and_custom_drops():
    spe, E = 10, 100
    total = spe * E
    for step in (500, 600, 999):
        assert lr_factor(step, spe, E, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * step / total)))
    assert lr_factor(0, spe, E, warmup_iters=0, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(35, spe, E, warmup_iters=0, drop_epochs=(2, 3), drop_factor=0.5) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 1, 1, schedule="linear")
