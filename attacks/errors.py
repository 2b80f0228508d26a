"""The attack engine's one error type."""


class AttackError(ValueError):
    """Bad attack argument (one clear line)."""
