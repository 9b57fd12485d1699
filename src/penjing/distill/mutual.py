"""Deep mutual learning (Zhang et al., CVPR 2018): peer students teach each other.

Each student minimises cross-entropy on the labels plus the mean KL divergence from every
peer's predicted distribution to its own. The peers' predictions are taken as fixed
targets (detached), so summing the students' losses and stepping once gives each student
exactly the gradient of its own loss; all students see the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from penjing.core.modes import eval_mode
from penjing.distill.kd import example_batch
from penjing.distill.losses import check_temperature, soft_target
from penjing.train import History, evaluate, make_optimizer, seed_everything


def mutual_losses(
    logits: Sequence[torch.Tensor], targets: torch.Tensor, temperature: float = 1.0
) -> list[torch.Tensor]:
    """Each student's loss: CE(its logits, labels) + mean over peers of KL(peer ‖ itself)."""
    if len(logits) < 2:
        raise ValueError(f"mutual learning needs at least 2 students, got {len(logits)}")
    losses = []
    for k, own in enumerate(logits):
        peers = [soft_target(own, other.detach(), temperature)
                 for j, other in enumerate(logits) if j != k]
        losses.append(nn.functional.cross_entropy(own, targets) + sum(peers) / len(peers))
    return losses


def mutual_(
    students: Sequence[nn.Module],
    loader: Iterable,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    temperature: float = 1.0,
    optimizer: str = "adam",
    test_loader: Iterable | None = None,
    seed: int | None = 0,
    progress: bool = True,
) -> list[History]:
    """Train `students` together in place; return one loss (and accuracy) history per student.

    The paper uses T = 1; a higher T scales the KL terms by T² as in `soft_target`.

    >>> h1, h2 = mutual_([pj.models.create("mlp30"), pj.models.create("mlp30")], train_loader)
    """
    from tqdm.auto import tqdm

    students = list(students)
    if len(students) < 2:
        raise ValueError(f"mutual learning needs at least 2 students, got {len(students)}")
    if len({id(s) for s in students}) != len(students):
        raise ValueError("the same module appears twice among the students; pass separate models")
    temperature = check_temperature(temperature)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    example = example_batch(loader)
    with torch.no_grad(), eval_mode(*students):
        outputs = [s(example) for s in students]
    for i, out in enumerate(outputs[1:], start=1):
        if out.shape != outputs[0].shape:
            raise ValueError(
                f"every student must predict the same classes: student 0 gives "
                f"{outputs[0].shape[1]} logits, student {i} gives {out.shape[1]}"
            )

    if seed is not None:
        seed_everything(seed)
    opt = make_optimizer([p for s in students for p in s.parameters()], optimizer, lr)
    histories = [History() for _ in students]
    bar = tqdm(range(epochs), desc="mutual", disable=not progress, leave=False)
    for _ in bar:
        for s in students:
            s.train()
        totals, batches = [0.0] * len(students), 0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            losses = mutual_losses([s(x) for s in students], y, temperature)
            sum(losses).backward()
            opt.step()
            totals = [t + float(loss.detach()) for t, loss in zip(totals, losses, strict=True)]
            batches += 1
        for history, total, s in zip(histories, totals, students, strict=True):
            history.loss.append(total / max(batches, 1))
            if test_loader is not None:
                history.accuracy.append(evaluate(s, test_loader))
        if test_loader is not None:
            bar.set_postfix(acc=" ".join(f"{h.accuracy[-1]:.4f}" for h in histories))
    for s in students:
        s.eval()
    return histories
