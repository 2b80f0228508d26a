"""Certified Lipschitz upper bounds, empirical lower bounds, certified accuracy (global and local: IBP, CROWN) and
the law of robustness' quantities.

    from lawbench.certify import lipschitz_upper, lipschitz_lower, certify_points, law_quantities

Imports torch and ``lawbench.models.layers`` only (never bench, attacks or datasets). A model is bounded only when
every module in it is an exact supported layer class (``supported_layers()``; the suite's ``Normalize`` and
``Residual`` by class identity) without hooks or forward overrides; anything else raises CertifyError naming the
module's path.
"""
from ._walk import CertifyError, check_model, supported_layers
from .certified import certified_accuracy, certified_radii, parse_norm
from .law import isoperimetry_constant_gaussian, law_bound, law_quantities
from .local import LocalBounds, local_certify, logit_intervals, margin_lower
from .lower import LowerBound, lipschitz_lower, local_lipschitz
from .points import PointCertificates, certify_points, radius_quartiles
from .upper import UpperBound, lipschitz_upper

__all__ = ["lipschitz_upper", "lipschitz_lower", "certified_accuracy", "certified_radii", "law_quantities",
           "law_bound", "isoperimetry_constant_gaussian", "local_lipschitz", "UpperBound", "LowerBound",
           "CertifyError", "parse_norm", "check_model", "supported_layers", "certify_points", "PointCertificates",
           "radius_quartiles", "local_certify", "margin_lower", "LocalBounds", "logit_intervals"]
