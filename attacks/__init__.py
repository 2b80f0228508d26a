"""Attack engine: batched PGD sweeps, the AutoAttack adapter, robust evaluation and an attack registry.

Imports torch (and pyautoattack / torchattacks lazily) only; never bench, models or datasets.
"""
from .pgd import (AttackError, PGDResult, attack_loss, box_bounds, default_step_size, pgd_perturb, pgd_sweep,
                  predict)
from .autoattack import AAResult, FLAG_DOC, run_autoattack
from .evaluate import RobustEval, SuiteStep, robust_eval
from .randomized import Randomized, is_randomized
from .registry import AttackEntry, AttackOutput, attack_entry, get_attack, list_attacks, register_attack

__all__ = [
    "AttackError", "PGDResult", "pgd_perturb", "pgd_sweep", "predict", "attack_loss", "box_bounds",
    "default_step_size", "AAResult", "FLAG_DOC", "run_autoattack", "RobustEval", "SuiteStep", "robust_eval",
    "AttackEntry", "AttackOutput", "attack_entry", "get_attack", "list_attacks", "register_attack", "Randomized",
    "is_randomized",
]
from .multi import MultiResult, pgd_sweep_multi, stack_models  # noqa: E402

__all__ += ["MultiResult", "pgd_sweep_multi", "stack_models"]
