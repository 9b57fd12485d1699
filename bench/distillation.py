"""Knowledge distillation on the MNIST subset: what a teacher adds to small students.

Writes the `distillation` section of BENCHMARKS.md: KD into a 784-30-10 MLP and a thin
LeNet-5 from a LeNet-5 teacher against the same students on labels alone; the same with
10 % of the labels plus data distillation on the rest; a 90 %-pruned LeNet-300-100
fine-tuned with and without KD; deep mutual learning against training alone. Every row is
mean ± standard deviation over 3 seeds, and every gain is paired by seed (same initial
weights, same batches). Run: `.venv/bin/python bench/distillation.py [--quick]`
(`--quick`: one seed, a few epochs, printed only, BENCHMARKS.md untouched).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import write_section
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

from penjing import data, models
from penjing.distill import (
    LABEL_PRESERVING,
    UNLABELED,
    Augmented,
    CachedTeacher,
    Ensemble,
    build_regressor,
    data_distill_,
    distill_,
    mutual_,
    pseudo_label,
    train_hints_,
)
from penjing.prune import magnitude_, masks
from penjing.train import evaluate, fit, seed_everything

STUDENTS = ("mlp30", "lenet5_thin")
STRONG = "KD from the small BN VGG, T = 4, α = 0.9"
AUGMENTED = "labels only, augmented"
CONSISTENT = "KD on the same augmented views, T = 2, α = 0.5"


@dataclass(frozen=True)
class Budget:
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_epochs: int = 10  # LeNet-5 and LeNet-300-100 teachers, all 4,000 labels
    epochs: int = 10  # every student, KD or not
    hint_epochs: int = 2  # FitNets: taken out of `epochs`, so the total is the same
    few_epochs: int = 36  # 400 labelled images, 7 batches: 252 steps
    few_dd_epochs: int = 4  # 4,000 images, 63 batches: 252 steps, the same budget
    finetune_epochs: int = 5  # the pruned LeNet-300-100


QUICK = Budget(seeds=(0,), teacher_epochs=3, epochs=2, hint_epochs=1, few_epochs=9,
               few_dd_epochs=1, finetune_epochs=1)


def loader(dataset, seed: int, batch_size: int = 64) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def fresh(name: str, seed: int) -> nn.Module:
    seed_everything(seed)
    return models.create(name)


def pct(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f} %"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} %"


def deltas(values: list[float], base: list[float]) -> list[float]:
    return [100 * (v - b) for v, b in zip(values, base, strict=True)]


def gain(values: list[float], base: list[float]) -> str:
    d = deltas(values, base)
    if len(d) == 1:
        return f"{d[0]:+.2f}"
    return f"**{statistics.mean(d):+.2f}** ± {statistics.stdev(d):.2f}"


def per_seed(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values)


# Student's t at 95 %, two-sided, for n seeds (n - 1 degrees of freedom)
T_95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}


def verdict(values: list[float], base: list[float]) -> str:
    """'helps' or 'hurts' when the paired mean difference is significant at 95 %."""
    d = deltas(values, base)
    if len(d) not in T_95:
        return "one seed, no verdict"
    error = statistics.stdev(d) / math.sqrt(len(d))
    t = statistics.mean(d) / error if error > 0 else math.copysign(math.inf, statistics.mean(d))
    if t > T_95[len(d)]:
        return "helps"
    if t < -T_95[len(d)]:
        return "hurts"
    return "no significant change"


def claim(label: str, values: list[float], base: list[float]) -> str:
    d = deltas(values, base)
    spread = f" ± {statistics.stdev(d):.2f}" if len(d) > 1 else ""
    return f"{label}: {statistics.mean(d):+.2f}{spread} points ({verdict(values, base)})"


def run_arms(arms: dict[str, Callable[[int], float]], seeds) -> dict[str, list[float]]:
    return {label: [arm(seed) for seed in seeds] for label, arm in arms.items()}


def table(rows: list[tuple[str, str, list[float], list[float] | None]]) -> list[str]:
    lines = ["| student | method | test accuracy | Δ points vs labels only | per seed |",
             "|---|---|---|---|---|"]
    for student, label, values, base in rows:
        delta = "—" if base is None else gain(values, base)
        lines.append(f"| {student} | {label} | {pct(values)} | {delta} | {per_seed(values)} |")
    return lines


def kd_section(split, test, budget: Budget, teacher: nn.Module, mlp_teacher: nn.Module,
               log, claims: list[str]) -> list[str]:
    """Students on all 4,000 labels: labels only, KD variants, ensemble, FitNets.

    Two more teachers test the usual remedies when KD does not help: a stronger one (the
    small BN VGG), and a LeNet-5 trained on the digit transforms that then sees the very
    augmented views the student trains on ("consistent" teaching, no cache possible).
    """
    cached = CachedTeacher(teacher)
    pair = CachedTeacher(Ensemble([teacher, mlp_teacher], temperature=4.0))
    strong = fresh("vgg", 0)
    fit(strong, loader(split.train, 0), epochs=budget.teacher_epochs, progress=False)
    strong_acc = evaluate(strong, test)
    consistent = fresh("lenet5", 0)
    fit(consistent, Augmented(loader(split.train, 0), LABEL_PRESERVING, seed=0),
        epochs=2 * budget.teacher_epochs, progress=False)
    consistent_acc = evaluate(consistent, test)
    log("extra teachers trained")

    def labels_only(name):
        def arm(seed):
            model = fresh(name, seed)
            fit(model, loader(split.train, seed), epochs=budget.epochs, seed=seed, progress=False)
            return evaluate(model, test)
        return arm

    def kd(name, teacher_model, **kwargs):
        def arm(seed):
            model = fresh(name, seed)
            distill_(teacher_model, model, loader(split.train, seed), epochs=budget.epochs,
                    seed=seed, progress=False, **kwargs)
            return evaluate(model, test)
        return arm

    def augmented(name, kd_teacher=None, **kwargs):
        def arm(seed):
            model = fresh(name, seed)
            train = Augmented(loader(split.train, seed), LABEL_PRESERVING, seed=seed)
            if kd_teacher is None:
                fit(model, train, epochs=budget.epochs, seed=seed, progress=False)
            else:
                distill_(kd_teacher, model, train, epochs=budget.epochs, seed=seed,
                        progress=False, **kwargs)
            return evaluate(model, test)
        return arm

    def fitnets(seed):
        model = fresh("lenet5_thin", seed)
        train = loader(split.train, seed)
        example = split.train.tensors[0][:2]
        reg = build_regressor(teacher, model, example, "conv2", "conv2")
        train_hints_(teacher, model, train, "conv2", "conv2", reg=reg,
                     epochs=budget.hint_epochs, seed=seed, progress=False)
        distill_(cached, model, train, epochs=budget.epochs - budget.hint_epochs, seed=seed,
                progress=False)
        return evaluate(model, test)

    rows = []
    for name in STUDENTS:
        t = time.perf_counter()
        arms = {
            "labels only (cross-entropy)": labels_only(name),
            "KD, T = 4, α = 0.9 (defaults)": kd(name, cached),
            "KD, T = 2, α = 0.5": kd(name, cached, temperature=2.0, alpha=0.5),
            "KD, T = 1, α = 0.5": kd(name, cached, temperature=1.0, alpha=0.5),
            "MSE on logits, α = 0.9": kd(name, cached, soft="mse"),
            "KD from LeNet-5 + LeNet-300-100 ensemble, T = 4": kd(name, pair),
            STRONG: kd(name, CachedTeacher(strong)),
            AUGMENTED: augmented(name),
            CONSISTENT: augmented(name, consistent, temperature=2.0, alpha=0.5),
        }
        if name == "lenet5_thin":
            arms[f"FitNets: {budget.hint_epochs} hint epochs conv2 → conv2, then KD"] = fitnets
        results = run_arms(arms, budget.seeds)
        base = results.pop("labels only (cross-entropy)")
        base_augmented = results.pop(AUGMENTED)
        weights = sum(p.numel() for p in models.create(name).parameters())
        student = f"{name} ({weights:,})"
        rows.append((student, "labels only (cross-entropy)", base, None))
        for label, values in results.items():
            if label != CONSISTENT:
                rows.append((student, label, values, base))
        rows.append((student, AUGMENTED, base_augmented, None))
        rows.append((student, CONSISTENT + " (Δ vs the row above)", results[CONSISTENT],
                     base_augmented))
        plain = {label: v for label, v in results.items() if label != CONSISTENT}
        best = max(plain, key=lambda label: statistics.mean(deltas(plain[label], base)))
        claims.append(claim(f"{name}, KD at the defaults vs labels only",
                            results["KD, T = 4, α = 0.9 (defaults)"], base))
        claims.append(claim(f"{name}, best variant measured ({best})", results[best], base))
        claims.append(claim(f"{name}, consistent KD on augmented views vs augmented labels",
                            results[CONSISTENT], base_augmented))
        log(f"KD into {name}: {time.perf_counter() - t:.0f} s")
    images, labels = split.train.tensors
    with torch.no_grad():
        logits = teacher.eval()(images)
    own = float((logits.argmax(1) == labels).float().mean())
    top = {t: float(torch.softmax(logits / t, 1).max(1).values.mean()) for t in (1.0, 4.0)}
    return [
        "### Students on all 4,000 labels",
        "",
        f"Teacher: LeNet-5 ({sum(p.numel() for p in teacher.parameters()):,} weights), "
        f"{budget.teacher_epochs} epochs, "
        f"**{100 * evaluate(teacher, test):.2f} %**; the ensemble adds LeNet-300-100 "
        f"({100 * evaluate(mlp_teacher, test):.2f} %); the stronger teacher is the small BN "
        f"VGG ({100 * strong_acc:.2f} %). Every student: {budget.epochs} epochs, Adam 1e-3, "
        "batch 64, no augmentation except in the last two rows per student, where each image "
        f"passes through one of the {len(LABEL_PRESERVING)} digit transforms (shifts, zooms, "
        "rotations; see the 10 % section) and the teacher, a LeNet-5 trained "
        f"{2 * budget.teacher_epochs} epochs on the same transforms "
        f"({100 * consistent_acc:.2f} %), sees the same transformed batch. "
        "On its own training images, which are the "
        f"images it distils on, the teacher is {100 * own:.2f} % right with a mean top "
        f"probability of {top[1.0]:.3f} at T = 1 and {top[4.0]:.3f} at T = 4.",
        "",
        *table(rows),
        *([] if all("(helps)" in c for c in claims if "at the defaults" in c) else [
            "",
            "KD's classic gain on MNIST (Hinton et al. 2015) came with 60,000 training images "
            "and a large, regularised student; here there are 4,000 images, small students "
            f"and {budget.epochs} epochs. The usual remedies when KD does not beat the labels "
            "are a stronger teacher and letting the teacher label the augmented views the "
            "student trains on; their rows above show how far each goes on this data.",
        ]),
    ]


def few_labels_section(split, test, budget: Budget, log, claims: list[str]) -> list[str]:
    """10 % of the labels: a LeNet-5 trained on them labels the other 90 % (data distillation)."""
    images, truth = split.train.tensors
    rows: dict[tuple[str, str], list[float]] = {}
    label_stats: dict[str, list[float]] = {"teacher": [], "identity": [], "ensemble": []}
    t = time.perf_counter()
    for seed in budget.seeds:
        labeled_idx = list(range(seed, len(images), 10))
        taken = set(labeled_idx)
        unlabeled_idx = [i for i in range(len(images)) if i not in taken]
        labeled = Subset(split.train, labeled_idx)
        few = loader(labeled, seed)
        teacher = fresh("lenet5", seed)
        fit(teacher, Augmented(few, LABEL_PRESERVING, seed=seed), epochs=budget.few_epochs,
            seed=seed, progress=False)
        label_stats["teacher"].append(evaluate(teacher, test))
        for key, views in (("identity", ("identity",)), ("ensemble", LABEL_PRESERVING)):
            labels = pseudo_label(teacher, images[unlabeled_idx], views).labels
            label_stats[key].append(float((labels == truth[unlabeled_idx]).float().mean()))
        unlabeled = TensorDataset(images[unlabeled_idx])
        no_labels = torch.full((len(unlabeled_idx),), UNLABELED)
        transfer = ConcatDataset([labeled, TensorDataset(images[unlabeled_idx], no_labels)])
        for name in STUDENTS:
            model = fresh(name, seed)
            fit(model, few, epochs=budget.few_epochs, seed=seed, progress=False)
            rows.setdefault((name, "labels only"), []).append(evaluate(model, test))
            model = fresh(name, seed)
            distill_(CachedTeacher(teacher), model, few, epochs=budget.few_epochs, seed=seed,
                    progress=False)
            rows.setdefault((name, "KD on the 400 labelled images"), []).append(
                evaluate(model, test))
            model = fresh(name, seed)
            data_distill_(teacher, model, labeled, unlabeled, epochs=budget.few_dd_epochs,
                         seed=seed, progress=False)
            rows.setdefault((name, "data distillation: + 3,600 pseudo-labelled"), []).append(
                evaluate(model, test))
            model = fresh(name, seed)
            distill_(CachedTeacher(teacher), model, loader(transfer, seed),
                    epochs=budget.few_dd_epochs, seed=seed, progress=False)
            rows.setdefault((name, "KD on all 4,000: soft targets, labels on the 400"),
                            []).append(evaluate(model, test))
        model = fresh("lenet5", seed)
        data_distill_(teacher, model, labeled, unlabeled, augment=True,
                     epochs=budget.few_dd_epochs, seed=seed, progress=False)
        rows.setdefault(("lenet5 (itself)", "data distillation, augmented"), []).append(
            evaluate(model, test))
    log(f"10 % labels: {time.perf_counter() - t:.0f} s")
    rows[("lenet5 (itself)", "labels only, augmented (the labelling model)")] = (
        label_stats["teacher"])
    for name in STUDENTS:
        for label in ("data distillation: + 3,600 pseudo-labelled",
                      "KD on all 4,000: soft targets, labels on the 400"):
            claims.append(claim(f"{name}, 10 % labels, {label.split(':')[0]} vs labels only",
                                rows[(name, label)], rows[(name, "labels only")]))
    claims.append(claim("lenet5 retrained on its own multi-transform pseudo-labels",
                        rows[("lenet5 (itself)", "data distillation, augmented")],
                        label_stats["teacher"]))
    lines = [
        "",
        "### Only 10 % of the labels (400 images), data distillation on the other 3,600",
        "",
        "Per seed a different 400-image labelled tenth. The labelling model is a LeNet-5 "
        f"trained on it for {budget.few_epochs} epochs through the {len(LABEL_PRESERVING)} "
        "digit transforms (shifts of 2 pixels, zoom ×1.1 / ×0.9, rotations of ±10°, "
        "identity), one drawn per image; it labels the 3,600 unlabelled images by its mean "
        "probability over the same transforms. Students train without augmentation on the "
        f"400 images for {budget.few_epochs} epochs ({budget.few_epochs * 7} steps of 64), or "
        f"on all 4,000 for {budget.few_dd_epochs} ({budget.few_dd_epochs * 63} steps). The "
        "last rows retrain the labelling model's architecture itself, augmented like it.",
        "",
        f"Labelling model: test accuracy {pct(label_stats['teacher'])}; pseudo-labels right "
        f"on the unlabelled images: {pct(label_stats['ensemble'])} with the multi-transform "
        f"ensemble, {pct(label_stats['identity'])} from the untransformed image alone.",
        "",
        "| student | method | test accuracy | Δ points vs labels only | per seed |",
        "|---|---|---|---|---|",
    ]
    for (name, label), values in rows.items():
        if name == "lenet5 (itself)":
            base = rows[("lenet5 (itself)", "labels only, augmented (the labelling model)")]
        else:
            base = rows[(name, "labels only")]
        delta = "—" if values is base else gain(values, base)
        lines.append(f"| {name} | {label} | {pct(values)} | {delta} | {per_seed(values)} |")
    return lines


def pruned_section(split, test, budget: Budget, teacher: nn.Module, log,
                   claims: list[str]) -> list[str]:
    """LeNet-300-100 pruned to 90 % in every layer, fine-tuned with and without KD."""
    results: dict[str, list[float]] = {}
    kept = []
    t = time.perf_counter()
    big = CachedTeacher(teacher)
    for seed in budget.seeds:
        dense = fresh("lenet300", seed)
        fit(dense, loader(split.train, seed), epochs=budget.teacher_epochs, seed=seed,
            progress=False)
        results.setdefault("dense", []).append(evaluate(dense, test))
        pruned = copy.deepcopy(dense)
        magnitude_(pruned, sparsity=0.9)
        results.setdefault("pruned, before fine-tuning", []).append(evaluate(pruned, test))
        teachers = {
            "fine-tuned on labels": None,
            "fine-tuned with KD from the dense LeNet-300-100": CachedTeacher(dense),
            "fine-tuned with KD from LeNet-5": big,
        }
        for label, kd_teacher in teachers.items():
            model, train = copy.deepcopy(pruned), loader(split.train, seed)
            if kd_teacher is None:
                fit(model, train, epochs=budget.finetune_epochs, lr=5e-4, seed=seed,
                    progress=False)
            else:
                distill_(kd_teacher, model, train, epochs=budget.finetune_epochs, lr=5e-4,
                        seed=seed, progress=False)
            masked = masks(model)
            layers = [module for name, module in model.named_modules() if name in masked]
            zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
            kept.append(zeros / sum(layer.weight.numel() for layer in layers))
            results.setdefault(label, []).append(evaluate(model, test))
    log(f"pruned LeNet-300-100: {time.perf_counter() - t:.0f} s")
    base = results["fine-tuned on labels"]
    for label in ("fine-tuned with KD from the dense LeNet-300-100",
                  "fine-tuned with KD from LeNet-5"):
        claims.append(claim(f"90 %-pruned LeNet-300-100 {label[11:]} vs on labels",
                            results[label], base))
    lines = [
        "",
        "### LeNet-300-100 pruned to 90 %, fine-tuned with and without KD",
        "",
        f"Dense model: {budget.teacher_epochs} epochs; one-shot magnitude pruning to 90 % in "
        f"every layer; fine-tuning {budget.finetune_epochs} epochs at Adam 5e-4, masks kept "
        f"(measured sparsity after fine-tuning: {100 * min(kept):.2f}–{100 * max(kept):.2f} %). "
        "KD at the defaults, T = 4, α = 0.9.",
        "",
        "| model | test accuracy | Δ points vs fine-tuned on labels | per seed |",
        "|---|---|---|---|",
    ]
    for label, values in results.items():
        delta = "—" if values is base or label in ("dense", "pruned, before fine-tuning") else (
            gain(values, base))
        lines.append(f"| {label} | {pct(values)} | {delta} | {per_seed(values)} |")
    return lines


def mutual_section(split, test, budget: Budget, log, claims: list[str]) -> list[str]:
    """Two peers trained together against the same two initialisations trained alone."""
    rows = []
    for name in STUDENTS:
        t = time.perf_counter()
        alone, together = [], []
        for seed in budget.seeds:
            inits = (seed, seed + 100)
            solo = []
            for init in inits:
                model = fresh(name, init)
                fit(model, loader(split.train, seed), epochs=budget.epochs, seed=seed,
                    progress=False)
                solo.append(evaluate(model, test))
            peers = [fresh(name, init) for init in inits]
            mutual_(peers, loader(split.train, seed), epochs=budget.epochs, seed=seed,
                    progress=False)
            alone.append(statistics.mean(solo))
            together.append(statistics.mean(evaluate(p, test) for p in peers))
        rows.append((name, alone, together))
        claims.append(claim(f"2 × {name} trained mutually vs alone", together, alone))
        log(f"mutual learning, {name}: {time.perf_counter() - t:.0f} s")
    lines = [
        "",
        "### Deep mutual learning: two peers against each trained alone",
        "",
        f"Both peers and their solo twins start from the same two initialisations and see "
        f"the same batches, {budget.epochs} epochs; each peer minimises cross-entropy + KL to "
        "the other (T = 1). Accuracy is the mean of the two models.",
        "",
        "| students | trained alone | trained together | Δ points | per seed (together) |",
        "|---|---|---|---|---|",
    ]
    for name, alone, together in rows:
        lines.append(f"| 2 × {name} | {pct(alone)} | {pct(together)} | {gain(together, alone)} "
                     f"| {per_seed(together)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="one seed, a few epochs; print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    budget = QUICK if args.quick else Budget()
    # Tiny models: one thread is faster than several and keeps the runs reproducible.
    torch.set_num_threads(1)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:4.0f} s] {message}", flush=True)

    split = data.mnist()
    test = DataLoader(split.test, batch_size=1000)
    teacher = fresh("lenet5", 0)
    fit(teacher, loader(split.train, 0), epochs=budget.teacher_epochs, progress=False)
    mlp_teacher = fresh("lenet300", 0)
    fit(mlp_teacher, loader(split.train, 0), epochs=budget.teacher_epochs, progress=False)
    log("teachers trained")
    lines = [
        "## Knowledge distillation on the MNIST subset",
        "",
        "4,000 training / 1,000 test images. Mean ± standard deviation over "
        f"{len(budget.seeds)} seed(s); Δ is the mean (± std) of the per-seed differences, "
        "each seed giving both arms the same initial weights and batches.",
        "",
    ]
    claims: list[str] = []
    sections = kd_section(split, test, budget, teacher, mlp_teacher, log, claims)
    sections += few_labels_section(split, test, budget, log, claims)
    sections += pruned_section(split, test, budget, teacher, log, claims)
    sections += mutual_section(split, test, budget, log, claims)
    lines += [
        "Paired differences, mean ± std over seeds; \"helps\" / \"hurts\" means the mean "
        "is beyond Student's t at 95 % for the number of seeds, otherwise no significant "
        "change:",
        "",
        *(f"- {c}" for c in claims),
        "",
        *sections,
        "",
        f"Whole run: {time.perf_counter() - start:.0f} s.",
    ]
    body = "\n".join(lines)
    print(body)
    write_section("distillation", body, quick=args.quick)


if __name__ == "__main__":
    main()
