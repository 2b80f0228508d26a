"""lawbench: measures adversarial robustness and Lipschitz bounds against the law of robustness' ratio p/(n·d)."""
__version__ = "0.1.0"
