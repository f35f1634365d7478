"""One model instance serving several threads at once (issue 23: no hidden per-call state). A forward pass keeps
nothing on the modules, so every thread gets exactly what a serial pass gives for its input: the logits in
evaluation (a small model of each family) and the loss and gradients in training (the families whose training
pass draws no random numbers). The threads start together and run their passes back to back, each round on another
input (inputs of different content and of two sizes)."""

import threading

import pytest
import torch

from offseg_hf import OffSegForSemanticSegmentation

from .conftest import TINY_ENCODER, build_model, tiny_config
from .test_fusion import FAMILIES, small_model

THREADS = 4
ROUNDS = 8
SIZES = ((64, 64), (70, 90))  # Mask2Former pads the second to 96x96: other feature and attention-mask sizes


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Each pass on one intra-op thread: the threads share the CPUs without oversubscribing them, and a pass splits
    its reductions the same way in every thread (the serial results are computed the same way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_together(function, jobs: list, rounds: int = ROUNDS) -> list[list]:
    """`function(job)` for every job, one thread per job, `rounds` times; the jobs move one thread on each round.
    Returns the results as [round][job]; raises what a thread raised.

    The threads start together (a barrier) and then run their rounds back to back: the jobs take different times,
    so each pass begins and ends at changing points of the others' passes, where state kept on a module between
    the calls of one pass would be overwritten."""
    barrier = threading.Barrier(len(jobs))
    results = [[None] * len(jobs) for _ in range(rounds)]
    errors = []

    def work(thread: int) -> None:
        try:
            barrier.wait()
            for round_ in range(rounds):
                job = (thread + round_) % len(jobs)
                results[round_][job] = function(jobs[job])
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)
            barrier.abort()  # the other threads stop waiting for this one

    threads = [threading.Thread(target=work, args=(thread,)) for thread in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


def assert_same(result: torch.Tensor, serial: torch.Tensor, where: str) -> None:
    assert result.shape == serial.shape, f"{where}: shape {tuple(result.shape)}, serially {tuple(serial.shape)}"
    assert torch.equal(result, serial), f"{where}: differs from the serial result by {(result - serial).abs().max()}"


def pixel_values(index: int) -> torch.Tensor:
    size = SIZES[index * len(SIZES) // THREADS]
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(index))


@pytest.mark.parametrize("family", FAMILIES)
def test_threads_sharing_a_model_get_the_serial_logits(family):
    model = small_model(family)
    # Mask2Former: every other job asks for the auxiliary outputs, which take transformers' pass instead of the
    # model's own inference pass, so the two kinds of pass run at once too.
    jobs = [
        (pixel_values(index), {"output_auxiliary_logits": True} if family == "mask2former" and index % 2 else {})
        for index in range(THREADS)
    ]

    def logits(job) -> torch.Tensor:
        inputs, options = job
        with torch.no_grad():  # per thread: grad mode is thread-local
            return model(inputs, **options).logits

    expected = [logits(job) for job in jobs]
    for round_, results in enumerate(run_together(logits, jobs)):
        for job, (result, serial) in enumerate(zip(results, expected, strict=True)):
            assert_same(result, serial, f"round {round_}, job {job}")


def training_model(family: str) -> OffSegForSemanticSegmentation:
    if family == "segformer":
        torch.manual_seed(0)
        # The stochastic depth of the encoder off: a training pass then draws no random numbers.
        model = OffSegForSemanticSegmentation(tiny_config(encoder_config={**TINY_ENCODER, "drop_path_rate": 0.0}))
    else:
        model = build_model(family)  # OffSeg-T: no stochastic depth, no dropout before the offset classifier
    return model.train()


@pytest.mark.parametrize("family", ["segformer", "offseg-t"])
def test_threads_training_a_shared_model_get_the_serial_loss_and_gradients(family):
    """In training, BatchNorm normalises with the batch's statistics and only writes its running statistics (which
    the threads then update in some order): the loss and gradients do not depend on them."""
    model = training_model(family)
    trained = {name: value for name, value in model.named_parameters() if value.requires_grad}
    names, parameters = list(trained), list(trained.values())
    jobs = []
    for index in range(THREADS):
        inputs = pixel_values(index)
        labels = torch.randint(
            0, model.config.num_labels, inputs.shape[-2:], generator=torch.Generator().manual_seed(index)
        )
        jobs.append((inputs, labels[None]))

    def loss_and_gradients(job) -> tuple[torch.Tensor, ...]:
        inputs, labels = job
        loss = model(inputs, labels=labels).loss
        # Gradients returned, not accumulated into the shared `.grad`s.
        return (loss.detach(), *torch.autograd.grad(loss, parameters))

    expected = [loss_and_gradients(job) for job in jobs]
    assert all(map(torch.equal, loss_and_gradients(jobs[0]), expected[0]))  # nothing random in the pass
    for round_, results in enumerate(run_together(loss_and_gradients, jobs, rounds=4)):
        for job, (result, serial) in enumerate(zip(results, expected, strict=True)):
            assert len(result) == len(serial) == len(parameters) + 1
            for name, value, serial_value in zip(["loss"] + names, result, serial, strict=True):
                assert_same(value, serial_value, f"round {round_}, job {job}, {name}")
