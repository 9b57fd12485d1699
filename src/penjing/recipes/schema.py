"""What a `penjing compress` recipe may say: one small frozen model per stage, each field
named as the library config it feeds names it (`ratio`, `criterion` and `round_to` are
`penjing.prune.ChannelConfig`'s) and as the command line's flag for it (`skip` is
`--skip`), checked by pydantic and the config before anything runs.

A stage is chosen by its `stage` key, and within prune and quantize by `structure` and
`method`, so every stage accepts exactly the keys that apply to it and an unknown one is
an error naming those that do.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from penjing.core import steps
from penjing.distill.losses import SOFT_LOSSES
from penjing.errors import PenjingError
from penjing.layers import chosen_layers
from penjing.prune.configs import STRUCTURES, by_method, config_for
from penjing.prune.heads import HEAD_CRITERIA
from penjing.prune.masking.magnitude import check_sparsity
from penjing.prune.masking.patterns import PATTERNS
from penjing.prune.schedule import SCHEDULES, cuts
from penjing.prune.structural.criteria import CRITERIA
from penjing.prune.structural.structured import CHANNEL_STRUCTURES, check_ratio
from penjing.quant.awq import AWQConfig
from penjing.quant.gptq import GPTQConfig
from penjing.quant.linear.observers import OBSERVERS
from penjing.quant.sharing.kmeans import INITS


def _checked(check: Callable[..., Any], what: str) -> AfterValidator:
    """A pydantic check that is the library's own, so a recipe's error reads as the
    config's does (the key path stands where the library names the field)."""
    def run(value: float) -> float:
        check(value, what)
        return value

    return AfterValidator(run)


# fractions of weights (sparsity) or channels (ratio) to remove: 1 would remove them all
Sparsity = Annotated[float, _checked(check_sparsity, "sparsity")]
Ratio = Annotated[float, _checked(check_ratio, "ratio")]
MaxRatio = Annotated[float, _checked(check_ratio, "max_ratio")]
# Every number has an upper bound a real run stays far below: a value past it is a typo
# (1e400 reads as infinity, 2**70 epochs never end) and is refused with its key and line.
Epochs = Annotated[int, Field(ge=0, le=100_000)]
Rate = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1, le=2**31 - 1)]  # images, batches, rounds
Bits = Annotated[int, Field(ge=1, le=16)]
# the names the library takes, so that the schema cannot fall behind it
Criterion = Literal[(*CRITERIA, "taylor")]  # type: ignore[valid-type]
HeadCriterion = Literal[HEAD_CRITERIA]  # type: ignore[valid-type]
Init = Literal[INITS]  # type: ignore[valid-type]
ObserverName = Literal[tuple(OBSERVERS)]  # type: ignore[valid-type]
SoftLoss = Literal[tuple(SOFT_LOSSES)]  # type: ignore[valid-type]


class RecipeError(PenjingError, ValueError):
    """A recipe that cannot run: each line names the file, line, key, rule and value."""

    lines = True  # the command line prints every problem, one per line


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Fit(_Config):
    """Options of `penjing.train.fit`, shared by the stages that train."""

    lr: Rate = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr_schedule: Literal["constant", "cosine"] = "constant"  # fit's `schedule`
    # network slimming: λ of the L1 penalty on BatchNorm scales (0: plain loss)
    bn_l1: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0


class Train(_Fit):
    """Train the model as it is (from scratch when no weights were given)."""

    stage: Literal["train"]
    epochs: Epochs = 10


class Finetune(_Fit):
    """Train again after pruning or quantization; masks and fake quantization stay."""

    stage: Literal["finetune"]
    epochs: Epochs = 3
    lr: Rate = 5e-4


class _Prune(_Config):
    """What every prune stage shares: when it cuts, and the training after each cut. The
    other keys are the fields of the stage's penjing.prune config, checked by it."""

    stage: Literal["prune"]
    # penjing.prune.cuts: one-shot cuts once; iterative: `rounds` cuts of the same share of
    # what is left (Han et al.); agp: Zhu & Gupta's cubic ramp over `rounds` cuts
    schedule: Literal[SCHEDULES] = "one-shot"  # type: ignore[valid-type]
    rounds: Annotated[int, Field(ge=1, le=1000)] = 1
    epochs: Epochs = 0  # fine-tuning after every cut, the last one included
    lr: Rate = 5e-4
    # BatchNorm statistics re-measured on this many batches after each cut (0: kept)
    bn_batches: Annotated[int, Field(ge=0, le=2**31 - 1)] = 20
    layers: list[str] | None = None  # module names (default: every layer the method handles)
    skip: list[str] = []  # regexes of module names left alone, as the CLI's --skip

    @model_validator(mode="after")
    def _config_and_schedule(self):
        # the config's and the schedule's own checks, in the words Python and the CLI give
        cuts(self.config(), self.schedule, self.rounds)
        return self

    def config(self, **override: Any) -> Any:
        """The penjing.prune config this stage describes (`override` replaces fields)."""
        names = {f.name for f in dataclasses.fields(STRUCTURES[self.structure])}
        fields = {k: v for k, v in self if k in names and k not in ("layers", "structure")}
        fields["layers"] = chosen_layers(self.layers, self.skip)
        return config_for(self.structure, **(fields | override))


class _Calibrated(_Prune):
    # which weights go: by magnitude, or by what each layer sees on calibration data
    # (penjing.prune.SparseGPTConfig / WandaConfig, layer by layer, block by block)
    method: Literal["magnitude", "sparsegpt", "wanda"] = "magnitude"
    calib_images: Count = 256  # sparsegpt / wanda: inputs they see

    def config(self, **override: Any) -> Any:
        return by_method(super().config(**override), self.method)


class PruneWeights(_Calibrated):
    """Single weights by magnitude (`penjing.prune.MagnitudeConfig`), or by SparseGPT or
    Wanda on calibration data; masks keep them zero."""

    structure: Literal["weight"]
    sparsity: Sparsity | dict[str, Sparsity] | None = None  # one for all, or per layer
    # Han's |w| < quality · std(w)
    quality: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    scope: Literal["layer", "global"] = "layer"


# groups of more than this many inputs are not N:M sparsity any hardware runs (2:4, 1:4,
# 4:8, 16:32 are); 1:10**12 would keep every weight of any real layer
MAX_NM = 256


class PruneNM(_Calibrated):
    """N:M semi-structured sparsity (`penjing.prune.NMConfig`): n of every m inputs kept,
    by magnitude, SparseGPT or Wanda."""

    structure: Literal["nm"]
    n: Annotated[int, Field(ge=1, le=MAX_NM)] = 2
    m: Annotated[int, Field(ge=2, le=MAX_NM)] = 4


class PrunePattern(_Prune):
    """Groups of weights of one shape (`penjing.prune.PatternConfig`), zeroed by group norm."""

    structure: Literal["shape", "kernel", "stripe", "vector", "block"]
    sparsity: Sparsity = 0.5


class PruneChannels(_Prune):
    """Channels removed for real (`penjing.prune.ChannelConfig`): a smaller dense model."""

    structure: Literal["group", "filter", "channel", "neuron"] = "group"
    ratio: Ratio = 0.5
    criterion: Criterion = "l1"
    taylor_batches: Count = 4  # batches the taylor criterion reads
    global_ranking: bool = False
    normalize: bool = True  # global ranking: scores over their group's mean
    round_to: Count = 1  # kept counts a multiple of this (8, 16, 64)
    max_ratio: MaxRatio = 0.9  # global ranking: no group loses more
    ratios: dict[str, Ratio] | None = None  # per producing layer, per-group mode


class PruneHeads(_Prune):
    """Attention heads removed for real (`penjing.prune.HeadConfig`)."""

    structure: Literal["head"]
    ratio: Ratio = 0.5
    criterion: HeadCriterion = "l1"


class Distill(_Config):
    """Train the model on a teacher's soft targets (`penjing.distill.distill`)."""

    stage: Literal["distill"]
    # "dense": the model before the first prune or quantize stage; an int: the model
    # stage number that ended with; else a model ('lenet5', 'package.module:function')
    teacher: str | int = "dense"
    teacher_weights: str | None = None  # with a teacher model: its safetensors / .pt
    epochs: Epochs = 5
    lr: Rate = 5e-4
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    temperature: Rate = 4.0
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.9  # weight of the soft targets
    soft: SoftLoss = "kl"
    hints: tuple[str, str] | None = None  # FitNets: (teacher layer, student layer)
    hint_epochs: Epochs = 2

    @model_validator(mode="after")
    def _weights_need_a_model(self):
        if self.teacher_weights is not None and (
            isinstance(self.teacher, int) or self.teacher == "dense"
        ):
            raise ValueError("teacher_weights loads a teacher model named in teacher (e.g. "
                             "'lenet5'); a stage's own model needs none")
        return self


class _Quantize(_Config):
    stage: Literal["quantize"]


class QuantKMeans(_Quantize):
    """Weight sharing (`penjing.quant.kmeans_`), then training of the shared centroids."""

    method: Literal["kmeans"]
    bits: Bits | dict[str, Bits] = 5  # for all layers, or per layer
    init: Init = "linear"
    layers: list[str] | None = None
    skip: list[str] = []  # regexes of module names left alone, as the CLI's --skip
    epochs: Epochs = 3  # centroid training
    lr: Rate = 1e-4


class _Linear(_Quantize):
    # `penjing.quant.QuantConfig`: layers is an ordered {regex: quantize?} over module names
    layers: dict[str, bool] = {}
    skip: list[str] = []  # regexes of module names left in float, as the CLI's --skip
    skip_first: bool = False  # the first quantizable layer stays float
    skip_last: bool = False  # the last quantizable layer stays float
    weight_range: Literal["minmax", "mse"] = "minmax"


class QuantPTQ(_Linear):
    """INT8 weights and activations, calibrated on training batches (`penjing.quant.ptq`)."""

    method: Literal["ptq"]
    granularity: Literal["channel", "tensor"] = "channel"  # of the weight scales
    observer: ObserverName = "minmax"
    reduce_range: bool = False  # 7-bit weights for x86 CPUs without VNNI
    calib_images: Count = 1024  # training images the observers see


class QuantQAT(QuantPTQ):
    """INT8 with quantization-aware training (`penjing.quant.qat`)."""

    method: Literal["qat"]  # type: ignore[assignment]
    calib_images: Count = 512
    learnable: bool = False  # LSQ: learn the scales
    epochs: Epochs = 2
    lr: Rate = 1e-4


class QuantGPTQ(_Quantize):
    """GPTQ (`penjing.quant.GPTQConfig`): weight-only INT4/INT3 with error correction
    measured on training inputs, block by block."""

    method: Literal["gptq"]
    bits: Annotated[int, Field(ge=2, le=8)] = 4
    group_size: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = 128
    symmetric: bool = False
    act_order: bool = True
    damp: Annotated[float, Field(gt=0, lt=1)] = 0.01
    block_size: Annotated[int, Field(ge=1, le=2**31 - 1)] = 128
    rounding: Literal["gptq", "nearest"] = "gptq"
    layers: list[str] | None = None
    skip: list[str] = []  # regexes of module names left in float, as the CLI's --skip
    calib_images: Count = 256

    def config(self) -> Any:
        return GPTQConfig(self.bits, self.group_size, self.symmetric, self.act_order,
                          self.damp, self.block_size, self.rounding,
                          chosen_layers(self.layers, self.skip))


class QuantAWQ(_Quantize):
    """AWQ (`penjing.quant.AWQConfig`): weight-only INT4/INT3 with activation-aware scales
    folded into the op before each layer, measured on training inputs, block by block."""

    method: Literal["awq"]
    bits: Annotated[int, Field(ge=2, le=8)] = 4
    group_size: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = 128
    symmetric: bool = False
    grid: Annotated[int, Field(ge=1, le=1000)] = 20
    clip: bool = True
    layers: list[str] | None = None
    skip: list[str] = []  # regexes of module names left in float, as the CLI's --skip
    calib_images: Count = 256

    def config(self) -> Any:
        return AWQConfig(self.bits, self.group_size, self.symmetric, self.grid, self.clip,
                         chosen_layers(self.layers, self.skip))


class QuantWeightOnly(_Linear):
    """Weights only (`penjing.quant.weight_only`): per channel or in groups."""

    method: Literal["weight_only"]
    bits: Annotated[int, Field(ge=2, le=8)] = 8
    group_size: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None


def _inside_out_dir(file: str) -> str:
    """A stage's `file`, if it stays inside the output folder: relative, without `..`."""
    parts = file.replace("\\", "/").split("/")
    if not file or os.path.isabs(file) or file.startswith(("/", "\\")) or ".." in parts:
        raise ValueError(f"must be a file name inside the output folder (--out-dir), got "
                         f"{file!r}; write 'model.pjz' or 'files/model.pjz', and copy the "
                         "file elsewhere afterwards")
    return file


OutFile = Annotated[str, AfterValidator(_inside_out_dir)]


class Encode(_Config):
    """Deep Compression storage (`penjing.codec.save`): a .pjz file, re-measured from disk."""

    stage: Literal["encode"]
    file: OutFile = "model.pjz"  # relative to the output folder, and inside it
    index_bits: Annotated[int, Field(ge=1, le=16)] | dict[str, Annotated[int, Field(ge=1, le=16)]] \
        | None = None  # relative-index gap width: None = 8 for conv, 5 for fc


class Export(_Config):
    """ONNX (`penjing.export.onnx`): FP32, or QDQ INT8 after ptq / qat; run in ONNX Runtime."""

    stage: Literal["export"]
    file: OutFile = "model.onnx"  # relative to the output folder, and inside it
    opset: Annotated[int, Field(ge=13)] = 17
    dynamic_batch: bool = True
    check: bool = True  # measure accuracy and latency in ONNX Runtime


class StepStage(_Config):
    """A registered step of one's own (`penjing.core.steps.register`): `stage` is its op,
    every other key a field of its config, checked as `steps.make_config` checks them."""

    model_config = ConfigDict(extra="allow", frozen=True)
    stage: str

    @model_validator(mode="after")
    def _config_fits(self):
        self.config()
        return self

    def config(self) -> Any:
        """The step's config dataclass from this stage's keys."""
        return steps.make_config(steps.get(self.stage).config, self.model_extra or {})


def stage_names() -> list[str]:
    """Every `stage:` a recipe may give: the built-in kinds, then registered steps."""
    return [*STAGES, *(op for op in steps.runnable() if op not in STAGES)]


PRUNE = {"weight": PruneWeights, "nm": PruneNM, "head": PruneHeads}
PRUNE |= dict.fromkeys(PATTERNS, PrunePattern)
PRUNE |= dict.fromkeys(CHANNEL_STRUCTURES, PruneChannels)
QUANTIZE = {"kmeans": QuantKMeans, "ptq": QuantPTQ, "qat": QuantQAT, "gptq": QuantGPTQ,
            "awq": QuantAWQ, "weight_only": QuantWeightOnly}
STAGES: dict[str, type[_Config] | None] = {  # None: chosen by granularity / method
    "train": Train, "prune": None, "finetune": Finetune, "distill": Distill,
    "quantize": None, "encode": Encode, "export": Export,
}
# the key that picks the model within a stage kind, and its value when absent
CHOOSER = {"prune": ("structure", "group"), "quantize": ("method", None)}
# keys a recipe used to take: read with a warning, under their new name
RENAMED = {
    "prune": {"granularity": "structure", "ignored_layers": "skip"},
    "quantize": {"first": "skip_first", "last": "skip_last", "calib_batches": "calib_images",
                 "per_channel": "granularity"},
}


def stage_tag(value: Any) -> str | None:
    """The class tag of a stage as written ('train', 'prune:weight', 'quantize:ptq'),
    or None when its kind or chooser is missing or unknown."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if not isinstance(value, dict) or not isinstance(value.get("stage"), str):
        return None  # (a mapping or list as `stage` is not a name: no membership test)
    if value["stage"] not in STAGES and value["stage"] in steps.runnable():
        return "step"
    if value["stage"] not in STAGES:
        return None
    kind = value["stage"]
    if kind not in CHOOSER:
        return kind
    key, default = CHOOSER[kind]
    choice = value.get(key, default)
    table = PRUNE if kind == "prune" else QUANTIZE
    if not isinstance(choice, str) or choice not in table:
        return None
    return f"{kind}:{table[choice].__name__}"


TAGS: dict[str, type[_Config]] = {name: cls for name, cls in STAGES.items() if cls}
TAGS |= {f"prune:{cls.__name__}": cls for cls in PRUNE.values()}
TAGS |= {f"quantize:{cls.__name__}": cls for cls in QUANTIZE.values()}
TAGS["step"] = StepStage

Stage = Annotated[
    Annotated[Train, Tag("train")] | Annotated[Finetune, Tag("finetune")]
    | Annotated[Distill, Tag("distill")] | Annotated[Encode, Tag("encode")]
    | Annotated[Export, Tag("export")]
    | Annotated[PruneWeights, Tag("prune:PruneWeights")]
    | Annotated[PruneNM, Tag("prune:PruneNM")]
    | Annotated[PrunePattern, Tag("prune:PrunePattern")]
    | Annotated[PruneChannels, Tag("prune:PruneChannels")]
    | Annotated[PruneHeads, Tag("prune:PruneHeads")]
    | Annotated[QuantKMeans, Tag("quantize:QuantKMeans")]
    | Annotated[QuantPTQ, Tag("quantize:QuantPTQ")]
    | Annotated[QuantQAT, Tag("quantize:QuantQAT")]
    | Annotated[QuantWeightOnly, Tag("quantize:QuantWeightOnly")]
    | Annotated[QuantGPTQ, Tag("quantize:QuantGPTQ")]
    | Annotated[QuantAWQ, Tag("quantize:QuantAWQ")]
    | Annotated[StepStage, Tag("step")],
    Discriminator(stage_tag),
]


class Recipe(_Config):
    """A whole `penjing compress` run: where the model and data come from, and the stages."""

    model: str  # a penjing model ('lenet300', 'vgg') or 'package.module:function'
    # modules imported first: they register steps of their own, which stages then name
    plugins: list[str] = []
    weights: str | None = None  # safetensors, or .pt read with weights_only=True
    data: str = "mnist"  # 'mnist', 'digits' or 'package.module:function' -> DataSplit
    # 'accuracy' (top-1), or 'package.module:function' (model, test_loader) -> float,
    # higher is better
    metric: str = "accuracy"
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0  # what numpy's generators take
    batch_size: Annotated[int, Field(ge=1, le=2**20)] = 64
    latency_batch: Annotated[int, Field(ge=1, le=2**20)] = 1  # images per timed forward pass
    stages: Annotated[list[Stage], Field(min_length=1)]

    @model_validator(mode="after")
    def _stages_in_order(self):
        check_order([s.stage if not isinstance(s, _Quantize) else f"quantize:{s.method}"
                     for s in self.stages])
        return self


def check_order(kinds: list[str]) -> None:
    """A ValueError unless the stages can run in this order: quantization is the last
    change to the weights' structure, so no prune stage and no second quantize stage
    follows a quantize stage (their layers are quantized ones, which they do not handle).
    Training, distillation, encode and export may follow it."""
    quantized = None
    for i, kind in enumerate(kinds):
        if quantized is not None and kind.split(":")[0] in ("prune", "quantize"):
            raise ValueError(
                f"stages[{i}] ({kind.split(':')[0]}) cannot follow stages[{quantized[0]}] "
                f"(quantize, {quantized[1]}): a stage that changes the weights goes before "
                "quantization; move it before stages[" + str(quantized[0]) + "]")
        if kind.startswith("quantize:"):
            quantized = (i, kind.split(":", 1)[1])
