"""Randomized models: detected by two eval forwards, judged by the majority of draws (a tie is no majority), attacked
with gradients averaged over draws (EOT); scaled logits: PGD ascends the margin where the softmax saturates."""
import torch

from lawbench.attacks.ascent import ModelGradient, Rows, loss_grad
from lawbench.attacks.randomized import Randomized, is_randomized, majority_misclassified
from lawbench.attacks.threat import attack_loss, ce_saturated, misclassified


class Noisy(torch.nn.Module):
    def __init__(self, sigma):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.sigma = sigma

    def forward(self, x):
        return self.lin(x + self.sigma * torch.randn_like(x))


class Cycle(torch.nn.Module):
    """Predicts from a fixed cycle of classes, one per forward pass: a randomized model whose draws we know."""

    def __init__(self, classes):
        super().__init__()
        self.classes, self.k = list(classes), 0

    def forward(self, x):
        c = self.classes[self.k % len(self.classes)]
        self.k += 1
        return torch.nn.functional.one_hot(torch.full((x.shape[0],), c), 3).float()


def test_detection():
    x = torch.rand(16, 4)
    torch.manual_seed(0)
    assert is_randomized(Noisy(0.1).eval(), x)
    assert not is_randomized(Noisy(0.0).eval(), x)
    assert is_randomized(Randomized(Noisy(0.0)), x)  # already wrapped


def test_majority_verdict_counts_draws_and_ties_go_to_the_label():
    x, y = torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)
    # label 0 predicted in 4 of 10 draws, class 1 in 6: misclassified by majority
    m = Randomized(Cycle([0, 1, 0, 1, 0, 1, 0, 1, 1, 1]), votes=10)
    assert bool(majority_misclassified(m, x, y).all())
    # 5 against 5: no majority against the label
    m = Randomized(Cycle([0, 1] * 5), votes=10)
    assert not bool(majority_misclassified(m, x, y).any())
    # label in 4 of 10, the others split 3/3: the label is the most frequent class, yet most draws misclassify
    m = Randomized(Cycle([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]), votes=10)
    assert bool(misclassified(m, x, y).all())  # threat.misclassified reads the wrapper
    # label in 6 of 10: most draws are right
    m = Randomized(Cycle([0, 1, 2, 0, 1, 0, 0, 1, 2, 0]), votes=10)
    assert not bool(misclassified(m, x, y).any())
    # one lucky draw decides nothing: a plain forward says misclassified, the majority does not
    m = Randomized(Cycle([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), votes=10)
    assert bool((m(x).argmax(1) != y).all()) and not bool(majority_misclassified(m, x, y).any())


def test_eot_gradient_is_the_sum_over_draws():
    torch.manual_seed(0)
    net = Noisy(0.3).eval()
    m = Randomized(net, eot=7)
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(1)
    z, g = ModelGradient(m, (4,), "ce")(Rows(x=x.clone(), y=y, lo=torch.zeros_like(x), hi=torch.ones_like(x), eps=0.1))
    # the same draws, one by one: the noise of draw k is rows k*5 .. k*5+4 of one randn_like over the repeated batch
    torch.manual_seed(1)
    noise = 0.3 * torch.randn(7 * 5, 4)
    xs = (x.repeat(7, 1) + noise).requires_grad_(True)
    zs = net.lin(xs)
    (gs,) = torch.autograd.grad(attack_loss(zs, y.repeat(7), "ce").sum(), xs)
    assert torch.allclose(g, gs.view(7, 5, 4).sum(0), atol=1e-6)
    assert torch.allclose(z, zs.detach().view(7, 5, 3).mean(0), atol=1e-6)


def test_saturated_cross_entropy_switches_to_the_margin():
    z = torch.tensor([[3e4, 1e4, -2e4], [2.0, 1.0, 0.5]])
    y = torch.tensor([0, 0])
    sat = ce_saturated(z, y)
    assert sat.tolist() == [True, False]
    # cross-entropy's own gradient vanishes on the saturated row; the loss used there is the margin's
    zl = z.clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(zl, y, reduction="none")[0], zl)
    assert bool((g_ce == 0).all())
    zl = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(attack_loss(zl, y, "ce").sum(), zl)
    assert g[0].tolist() == [-1.0, 1.0, 0.0]  # d(z_1 - z_0)
    assert torch.allclose(g[1], torch.softmax(z[1], 0) - torch.tensor([1.0, 0, 0]))
    # the closed form of the autograd-free MLP path agrees
    assert torch.allclose(loss_grad(z.clone(), y, "ce", None), g)
