"""vitask_pl.modules.optim: the warmup + cosine multiplier and the optimizer wiring every stage shares."""

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from vitask_pl.modules.optim import configure_optimizers, warmup_cosine


def test_warmup_rises_linearly_to_one_then_cosine_decays_to_zero():
    f = warmup_cosine(total_steps=10, warmup_steps=2)
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert [f(s) for s in range(11)] == pytest.approx(expected, abs=1e-12)
    assert (f(2), f(6), f(10)) == pytest.approx((1.0, 0.5, 0.0), abs=1e-12)


def test_past_the_end_stays_at_zero():
    f = warmup_cosine(10, 2)
    assert [f(s) for s in (10, 11, 50)] == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)  # no cosine rising again


def test_no_warmup_starts_at_full_rate():
    f = warmup_cosine(4, 0)
    assert [f(s) for s in range(5)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    )


def test_warmup_as_long_as_the_run_does_not_divide_by_zero():
    f = warmup_cosine(3, 3)
    assert [f(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 0.0])


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trained, self.frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def module_with(steps):
    return SimpleNamespace(trainer=SimpleNamespace(estimated_stepping_batches=steps))


def test_only_trainable_parameters_reach_the_optimizer():
    net, seen = Two(), []

    def optimizer(params):
        seen.extend(params)
        return torch.optim.SGD(seen, lr=1.0)

    out = configure_optimizers(module_with(10), net.parameters(), optimizer, None, warmup_ratio=0.0)
    assert [id(p) for p in seen] == [id(net.trained.weight), id(net.trained.bias)]
    assert out["optimizer"].param_groups[0]["params"] == seen


def test_default_schedule_steps_per_optimizer_step_over_the_whole_run():
    net = Two()
    out = configure_optimizers(
        module_with(10.0), net.parameters(), partial(torch.optim.SGD, lr=0.1), None, warmup_ratio=0.25
    )
    opt, schedule = out["optimizer"], out["lr_scheduler"]
    assert schedule["interval"] == "step" and isinstance(schedule["scheduler"], torch.optim.lr_scheduler.LambdaLR)
    f, lrs = warmup_cosine(10, 2), []  # int(0.25 * 10) = 2 warmup steps
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule["scheduler"].step()
    assert lrs == pytest.approx([0.1 * f(s) for s in range(11)])
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1]) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_an_injected_scheduler_is_returned_as_is_and_the_trainer_not_asked():
    net, made = Two(), []

    def scheduler(opt):
        made.append(torch.optim.lr_scheduler.StepLR(opt, step_size=1))
        return made[-1]

    module = SimpleNamespace()  # no trainer: estimated_stepping_batches must not be read
    out = configure_optimizers(module, net.parameters(), partial(torch.optim.AdamW, lr=1e-3), scheduler, 0.1)
    assert out["lr_scheduler"] is made[0] and made[0].optimizer is out["optimizer"]
    assert isinstance(out["optimizer"], torch.optim.AdamW) and set(out) == {"optimizer", "lr_scheduler"}
