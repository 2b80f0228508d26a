"""law_quantities against hand computations."""
from __future__ import annotations

import json
import math

import pytest

from lawbench.certify import CertifyError, isoperimetry_constant_gaussian, law_quantities


def test_ratios_and_scale_by_hand():
    q = law_quantities(200_000, 5_000, 784, 12.5)
    assert q["ratio"] == pytest.approx(200_000 / 3_920_000)            # 0.05102...
    assert q["ratio"] == pytest.approx(0.0510204081632653)
    assert q["ratio_eff"] == pytest.approx(200_000 / 62_500)            # 3.2
    assert q["law_scale"] == pytest.approx(math.sqrt(19.6))             # sqrt(3.92e6 / 2e5)
    assert q["law_scale_eff"] == pytest.approx(math.sqrt(0.3125))
    json.dumps(q)                                                        # row-ready


def test_theorem3_bound_by_hand():
    # p = 100, n = 1e6, d = 10, eps = 0.5, delta = 0.01, c = 1, W = 1, J = 1/30:
    # 60 W J / eps = 4, denominator = 100 ln 4 + ln 400 = 138.629436 + 5.991465 = 144.620901
    # bound = 0.5 / 512 * sqrt(1e7 / 144.620901) = 0.0009765625 * 262.9567... = 0.2567935...
    q = law_quantities(100, 1_000_000, 10, eps=0.5, delta=0.01, c=1.0, W=1.0, J=1 / 30, k=1)
    assert q["law_bound"] == pytest.approx(0.5 / 512 * math.sqrt(1e7 / 144.62090066), rel=1e-8)
    assert q["law_bound"] == pytest.approx(0.25679, rel=1e-4)
    # c scales the bound by 1/sqrt(c)
    q4 = law_quantities(100, 1_000_000, 10, eps=0.5, delta=0.01, c=4.0, W=1.0, J=1 / 30, k=1)
    assert q4["law_bound"] == pytest.approx(q["law_bound"] / 2)
    # applicability: 8^4 k log(8k/delta) = 4096 * ln 800 = 27380.1 <= n eps^2 = 250000
    assert q["law_applicable"] is True and q["law_flag"] == ""
    assert q["law_params"] == {"eps": 0.5, "delta": 0.01, "c": 1.0, "W": 1.0, "J": 1 / 30, "k": 1}


def test_small_n_is_flagged_vacuous():
    # label noise 0.2 -> eps = sigma^2 = 4 * 0.2 * 0.8 = 0.64; k = 10 classes: 4096 * 10 * ln(8000) = 368115.6
    q = law_quantities(10_000, 500, 64, num_classes=10, label_noise=0.2)
    assert q["law_params"]["eps"] == pytest.approx(0.64)
    assert q["law_params"]["k"] == 10
    assert q["law_applicable"] is False
    assert q["law_flag"].startswith("law-bound-vacuous: n*eps^2 = 204.8 < 8^4 k log(8k/delta) = 3.681e+05")
    assert "needs n >= 898720" in q["law_flag"]                          # ceil(368115.6 / 0.4096)
    assert q["law_bound"] is not None and q["law_bound"] > 0               # the formula's value is still reported
    q = law_quantities(10_000, 1_000_000, 64, num_classes=10, label_noise=0.2)
    assert q["law_applicable"] is True and q["law_flag"] == ""


def test_defaults_documented_values():
    q = law_quantities(400, 100, 4)
    assert q["law_params"] == {"eps": 0.1, "delta": 0.01, "c": 1.0, "W": 40.0, "J": 400.0, "k": 1}
    expected = 0.1 / 512 * math.sqrt(400 / (400 * math.log(60 * 40 * 400 / 0.1) + math.log(400)))
    assert q["law_bound"] == pytest.approx(expected)
    assert q["ratio_eff"] is None and q["law_bound_eff"] is None


def test_no_label_noise_means_no_bound():
    q = law_quantities(1000, 500, 64, 8.0, label_noise=0.0)
    assert q["law_bound"] is None and q["law_applicable"] is False
    assert q["law_flag"].startswith("law-bound-vacuous: no label noise")
    assert q["ratio"] == pytest.approx(1000 / 32000)


def test_isoperimetry_constant_for_gaussians():
    assert isoperimetry_constant_gaussian(1 / math.sqrt(64), 64) == pytest.approx(1.0)   # N(0, I/d)
    assert isoperimetry_constant_gaussian(0.1, 784) == pytest.approx(7.84)


@pytest.mark.parametrize("kwargs", [dict(p=0, n=1, d=1), dict(p=1, n=-3, d=1), dict(p=1, n=1, d=float("nan")),
                                    dict(p=1, n=1, d=1, delta=1.5), dict(p=1, n=1, d=1, eps=2.0),
                                    dict(p=1, n=1, d=1, label_noise=1.5)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(CertifyError):
        law_quantities(**kwargs)
