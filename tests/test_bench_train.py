import torch

from lawbench import datasets
from lawbench import models
from bench.train import TrainConfig, accuracy, train


def _data():
    return datasets.load_dataset("mnist5k", n_train=1000, n_test=200, seed=0)


def _trained(cfg):
    data = _data()
    torch.manual_seed(cfg.seed)
    model = models.get_model("mlp", in_shape=data.meta.in_shape, num_classes=10, width=128)
    result = train(model, data.x_train, data.y_train, cfg)
    return model, result, data


def test_erm_is_deterministic_and_learns():
    cfg = TrainConfig(epochs=8, seed=3)
    a, ra, data = _trained(cfg)
    b, rb, _ = _trained(cfg)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert ra.train_acc == rb.train_acc
    assert accuracy(a, data.x_test, data.y_test) > 0.6
    c, _, _ = _trained(TrainConfig(epochs=8, seed=4))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))  # another seed, other weights


def test_erm_stops_at_target_train_accuracy():
    _, result, _ = _trained(TrainConfig(epochs=50, target_train_acc=0.95, seed=0))
    assert result.train_acc >= 0.95 and result.epochs_run < 50


def test_pgd_at_is_deterministic_and_more_robust_than_erm():
    from lawbench.attacks import pgd_perturb
    cfg = TrainConfig(recipe="pgd-at", epochs=8, train_eps=0.1, train_steps=5, seed=1)
    a, _, data = _trained(cfg)
    b, _, _ = _trained(cfg)
    assert all(torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), b.state_dict().values()))
    erm, _, _ = _trained(TrainConfig(epochs=8, seed=1))

    def robust(model):
        x_adv = pgd_perturb(model, data.x_test, data.y_test, 0.1, norm="Linf", steps=20)
        return accuracy(model, x_adv, data.y_test)

    assert robust(a) > robust(erm)
