"""The training loop (offseg_hf/training/loop.py): gradient accumulation through Accelerate."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.nn import functional as F

from offseg_hf.training.loop import TrainerState, train


class PixelClassifier(nn.Module):
    """Without BatchNorm, so that two micro-batches of 2 and one batch of 4 define the same gradient."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=1)

    def forward(self, pixel_values, labels):
        return SimpleNamespace(loss=F.cross_entropy(self.conv(pixel_values), labels))


def run(
    images, labels, micro_batch: int, accumulation: int, steps: int, clip_grad_norm: float = 0.0
) -> dict[str, torch.Tensor]:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(
            cpu=True, gradient_accumulation_steps=accumulation, step_scheduler_with_optimizer=False
        )
        torch.manual_seed(0)
        model = PixelClassifier()
        # Plain SGD: its step is proportional to the gradient, so a loss that is not averaged over micro-steps,
        # or a step taken after every micro-batch, changes the result (Adam would hide a scale error).
        optimizer = torch.optim.SGD([{"params": model.parameters(), "name": "all", "lr_mult": 1.0}], lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        batches = iter(
            {"pixel_values": images[i : i + micro_batch], "labels": labels[i : i + micro_batch]}
            for i in range(0, len(images), micro_batch)
        )
        state = TrainerState()
        train(
            accelerator,
            model,
            optimizer,
            scheduler,
            batches,
            state,
            max_steps=steps,
            images_per_step=4,
            clip_grad_norm=clip_grad_norm,
        )
        assert state.step == steps and state.samples_seen == 4 * steps
        return {name: value.detach().clone() for name, value in accelerator.unwrap_model(model).state_dict().items()}
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_two_micro_batches_of_two_equal_one_batch_of_four():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 5, 5, generator=generator)
    labels = torch.randint(0, 4, (12, 5, 5), generator=generator)
    whole = run(images, labels, micro_batch=4, accumulation=1, steps=3)
    accumulated = run(images, labels, micro_batch=2, accumulation=2, steps=3)
    every_micro_batch = run(images, labels, micro_batch=2, accumulation=1, steps=6)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=0, atol=1e-6)
    assert any((every_micro_batch[name] - whole[name]).abs().max() > 1e-3 for name in whole)
    with pytest.raises(AssertionError):  # a step after every micro-batch is a different run: the test can tell
        for name in whole:
            torch.testing.assert_close(every_micro_batch[name], whole[name], rtol=0, atol=1e-6)


def test_gradient_clipping_bounds_each_step_by_the_norm():
    # With SGD (lr 0.5), a step moves the weights by lr x the clipped gradient: at most 0.5 x 0.01 in L2 norm. The
    # unclipped gradient here is 20 times larger, so the bound is the clipping's doing.
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 5, 5, generator=generator)
    labels = torch.randint(0, 4, (4, 5, 5), generator=generator)
    torch.manual_seed(0)
    start = {name: value.detach().clone() for name, value in PixelClassifier().state_dict().items()}
    clipped = run(images, labels, micro_batch=4, accumulation=1, steps=1, clip_grad_norm=0.01)
    free = run(images, labels, micro_batch=4, accumulation=1, steps=1)

    def step_norm(weights):
        return torch.sqrt(sum(((weights[name] - start[name]) ** 2).sum() for name in start)).item()

    assert step_norm(clipped) == pytest.approx(0.5 * 0.01, rel=1e-4)
    assert step_norm(free) > 10 * step_norm(clipped)
