"""Training recipes: `erm` (train to interpolation), `pgd-at` (Madry adversarial training), `ibp` (certified
training through interval bounds, Gowal et al. 2018) and `smooth` (the smoothest interpolator a penalty search finds
from ERM's, see bench.smooth; the runner chains the two).

Every random choice (initialization is seeded by the caller, batch order and PGD random starts here) flows from the
config's seed through local generators, so a cell trains to the same weights on CPU every time.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from bench import optim

RECIPES = ("erm", "pgd-at", "smooth", "ibp")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = "erm"
    epochs: int = 30                  # maximum number of epochs
    optimizer: str = "adam"           # one of OPTIMIZERS
    lr: float = 1e-3
    momentum: float = 0.9             # sgd only
    weight_decay: float = 0.0
    batch_size: int = 128
    target_train_acc: float = 1.0     # erm: stop once clean train accuracy (on the given labels) reaches this
    train_eps: float = 0.0            # pgd-at: radius of the training attack, pixel units
    train_norm: str = "Linf"
    train_steps: int = 10
    train_step_size: float = 0.0      # 0: 2.5·eps/steps (Madry et al.)
    train_eps_warmup: int = 0         # pgd-at, ibp: epochs over which eps ramps up linearly from 0
    ibp_kappa: float = 0.5            # ibp: weight of the clean loss once eps has ramped up (1 at the start)
    ibp_clean_epochs: int = 1         # ibp: epochs of clean training before the ramp
    smooth_margin: float = 1.0        # smooth: the logit margin every training point is asked to keep
    smooth_lambda: float = 1e-3       # smooth: the first penalty of the search
    smooth_growth: float = 4.0        # smooth: factor between penalties while the model still interpolates
    smooth_stages: int = 6            # smooth: most growth stages
    smooth_epochs: int = 50           # smooth: fine-tuning epochs per stage
    smooth_refine: int = 1            # smooth: bisection steps after the first penalty that breaks the fit
    smooth_lr: float = 0.0            # smooth: fine-tuning rate; 0: lr / 10 (a fresh optimizer at the full rate
                                      # knocks memorised points over)
    smooth_restarts: int = 2          # smooth: attempts from ERM beyond the first (bench.smooth.starts)
    smooth_scratch: int = 1           # smooth: 1 adds an attempt from a fresh initialisation
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    epochs_run: int
    train_acc: float
    seconds: float
    history: list = field(default_factory=list)  # (epoch, loss, train_acc)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of points classified as labelled; the model is put in eval mode."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / max(1, len(x))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return optim.build(torch.optim.Adam, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return optim.build(torch.optim.SGD, params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}' (known: {', '.join(OPTIMIZERS)})")


def ibp_ramp(cfg: TrainConfig, epochs_done: float) -> float:
    """How far the ibp recipe is along its schedule (0 to 1): clean for ibp_clean_epochs, then eps and the robust
    loss's weight ramp up linearly over train_eps_warmup epochs (Gowal et al. 2018)."""
    if cfg.train_eps_warmup <= 0:
        return 1.0 if epochs_done >= cfg.ibp_clean_epochs else 0.0
    return min(1.0, max(0.0, (epochs_done - cfg.ibp_clean_epochs) / cfg.train_eps_warmup))


def ibp_loss(model, xb, yb, eps: float, kappa: float, in_shape: tuple) -> torch.Tensor:
    """kappa · CE(clean logits) + (1 - kappa) · CE(worst-case logits over the Linf ball of radius eps): the logits
    interval bound propagation bounds, the true class at its lowest and every other at its highest (Gowal et al.
    2018), differentiable through a live walk of the model (lawbench.certify: the layers certification bounds)."""
    clean = F.cross_entropy(model(xb), yb)
    if eps <= 0 or kappa >= 1:
        return clean
    from lawbench.certify import logit_intervals
    lo, hi = logit_intervals(model, xb, eps, in_shape)
    worst = torch.where(F.one_hot(yb, lo.shape[1]).bool(), lo, hi)
    return kappa * clean + (1 - kappa) * F.cross_entropy(worst, yb)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
          device: torch.device | str = "cpu", progress=None) -> TrainResult:
    """Train `model` in place on (x, y); `progress(epoch, epochs, train_acc)` is called after every epoch."""
    if cfg.recipe not in RECIPES:
        raise ValueError(f"unknown recipe '{cfg.recipe}' (known: {', '.join(RECIPES)})")
    if cfg.recipe == "smooth":  # not a loop of its own: a search that starts from a trained ERM model
        raise ValueError("recipe 'smooth' starts from an ERM interpolator: train with recipe 'erm', then call "
                         "bench.smooth.search (the runner chains the two)")
    if cfg.recipe == "pgd-at":
        from lawbench.attacks import pgd_perturb  # the attack engine owns PGD; training only calls it
    if cfg.recipe == "ibp" and cfg.train_norm != "Linf":
        raise ValueError(f"recipe 'ibp' trains against Linf balls only, got train_norm={cfg.train_norm!r}")
    device = torch.device(device)
    model.to(device)
    x, y = x.to(device), y.to(device)
    in_shape = tuple(x.shape[1:])
    gen = torch.Generator().manual_seed(cfg.seed)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    opt = _optimizer(model, cfg)
    start = time.perf_counter()
    history, acc, epoch = [], 0.0, 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(x), generator=gen).to(device)
        eps = cfg.train_eps
        if cfg.train_eps_warmup > 0 and cfg.recipe == "pgd-at":
            eps = cfg.train_eps * min(1.0, epoch / cfg.train_eps_warmup)
        total_loss = 0.0
        batches = math.ceil(len(x) / cfg.batch_size)
        for b, i in enumerate(range(0, len(x), cfg.batch_size)):
            idx = order[i:i + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if cfg.recipe == "pgd-at" and eps > 0:
                model.eval()
                xb = pgd_perturb(model, xb, yb, eps, norm=cfg.train_norm, steps=cfg.train_steps,
                                 step_size=cfg.train_step_size or None, random_start=True, generator=attack_gen)
            model.train()
            if cfg.recipe == "ibp":
                t = ibp_ramp(cfg, epoch - 1 + b / batches)
                loss = ibp_loss(model, xb, yb, t * cfg.train_eps, 1 - t * (1 - cfg.ibp_kappa), in_shape)
            else:
                loss = F.cross_entropy(model(xb), yb)
            optim.zero_grad(opt)
            loss.backward()
            optim.step(opt)
            total_loss += loss.item() * len(idx)
        acc = accuracy(model, x, y)
        history.append((epoch, total_loss / len(x), acc))
        if progress is not None:
            progress(epoch, cfg.epochs, acc)
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {total_loss}); lower lr")
        if cfg.recipe == "erm" and acc >= cfg.target_train_acc:
            break
    model.eval()
    return TrainResult(epochs_run=epoch, train_acc=acc, seconds=time.perf_counter() - start, history=history)
