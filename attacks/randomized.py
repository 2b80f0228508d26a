"""Randomized models: a model whose eval-mode forward pass is random (input noise, random resizing, dropout kept on).

One lucky draw must never decide a result, and one noisy gradient must never steer an attack. Once detected
(:func:`is_randomized`: the same input, two forward passes, different logits), the model is seen by every attack
through :class:`Randomized`:

* verdicts: a point counts as misclassified only when most of its ``votes`` draws misclassify it (the label wins
  fewer than half of them; a tie is no majority) -- :func:`attacks.threat.misclassified` reads this wrapper;
* gradients: every gradient stage averages ``eot`` draws (expectation over transformation, pyautoattack's rand
  protocol: EOT 20); our PGD repeats each row ``eot`` times in one batch, the original APGD takes ``eot_iter``.
"""
from __future__ import annotations

import torch

EOT_DRAWS = 20   # gradient draws per step (pyautoattack's version="rand")
VOTE_DRAWS = 25  # forward draws per verdict: fewer make each re-judging of a borderline example a coin flip


class Randomized(torch.nn.Module):
    """A randomized model as attacks see it: forward is one draw; ``votes`` draws decide a verdict, ``eot`` draws
    average a gradient. Wrapping is idempotent (see :func:`randomized`)."""

    def __init__(self, model: torch.nn.Module, eot: int = EOT_DRAWS, votes: int = VOTE_DRAWS):
        super().__init__()
        self.model = model
        self.eot = int(eot)
        self.votes = int(votes)

    def forward(self, x):
        return self.model(x)

    @torch.no_grad()
    def vote_counts(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) how many of ``votes`` draws predict each class."""
        counts = None
        for _ in range(self.votes):
            z = self.model(x)
            one = torch.nn.functional.one_hot(z.argmax(1), z.shape[1]).to(torch.int32)
            counts = one if counts is None else counts + one
        return counts

    def mean_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits averaged over ``eot`` draws, the draws as rows of one batch."""
        z = self.model(x.repeat(self.eot, *([1] * (x.dim() - 1))))
        return z.view(self.eot, x.shape[0], -1).mean(0)


# logits differing by more than this share of their scale make a model randomized; below it, the differences are
# the float non-determinism of some GPU kernels (atomic adds), which must not cost a deterministic model EOT
RANDOM_REL = 1e-5


def is_randomized(model: torch.nn.Module, x: torch.Tensor, points: int = 32) -> bool:
    """True when two eval-mode forward passes on the same inputs give different logits (the caller sets eval mode)."""
    if isinstance(model, Randomized):
        return True
    if x.shape[0] == 0:
        return False
    xs = x[:points]
    with torch.no_grad():
        a, b = model(xs), model(xs)
    return bool((a - b).abs().max() > RANDOM_REL * a.abs().max().clamp_min(1e-30))


def randomized(model: torch.nn.Module, eot: int = EOT_DRAWS, votes: int = VOTE_DRAWS) -> Randomized:
    """``model`` seen through :class:`Randomized` (itself when it already is)."""
    return model if isinstance(model, Randomized) else Randomized(model, eot, votes)


def majority_misclassified(model: Randomized, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bool (N,): most of ``model.votes`` draws misclassify the point (the label wins fewer than half of them; a tie
    is no majority). Not "another class out-votes the label": a point classified correctly in 10 of 25 draws, the
    other 15 split between wrong classes, is misclassified by most draws."""
    counts = model.vote_counts(x)
    own = counts.gather(1, y.to(counts.device)[:, None]).squeeze(1)
    return 2 * own < counts.sum(1)
