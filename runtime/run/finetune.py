"""Quantisation-aware fine-tuning: `apply`, then train the converted model with the quantisers in the loop.

In: a float model, a `Plan`, the `RunSettings` of `apply` and `FinetuneSettings`. Out: a `FinetuneResult`
whose `result` is an `ApplyResult` like `apply`'s (so `pipeline.write_apply_outputs` writes the same four
files), with the fine-tuned model, the learned Δ/α in its configs and quant config, and a report that holds
the accuracy before (`post_training_accuracy`) and after (`ternary_accuracy`) fine-tuning.

How it trains (see `train_quantized`):
- Weights: the ternary modules' training mode re-quantises the float (latent) weights at every step with a
  straight-through estimator; Δ of a weight stays the calibrated one, α follows the weight (as in `apply`).
- Activations: with `learn_activations` (the default) every scaled ternary data_in gets a learned step
  (`quantize.learned`, LSQ): Δ and α are trained with the weights, their ratio fixed from calibration.
  Without it, data_in's Δ and α stay as calibrated (measured: no gain from fine-tuning then).
- Loss: cross-entropy on the train split, optionally mixed with knowledge distillation from the float
  model (`distill` = weight of the distillation term, Hinton et al. 2015, temperature `temperature`).
- Adam, cosine learning-rate decay to 0 over all steps, the final state is kept (no selection on the
  validation split, which reports the accuracy). Everything random follows `seed`.
- Under torch.distributed (torchrun, `--workers N`): DistributedDataParallel (gloo on CPU). Each global batch
  of `batch_size` samples, drawn from the same seeded permutation as in one process, is cut into one
  contiguous share per process, and each process's loss is weighted so that the averaged gradient is the
  gradient of the global batch's mean loss: N processes take the same steps as one, up to rounding.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import attrs
import torch
from attrs import field, frozen
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ternqc.plan import Plan
from ternqc.runtime import ranges
from ternqc.runtime.errors import UserError
from ternqc.runtime.models.data import build_dataset
from ternqc.runtime.models.evaluate import batch_loss, forward_logits, loss_and_accuracy
from ternqc.runtime.models.train import LiveDesc, threads_for
from ternqc.runtime.progress import progress as progress_bar
from ternqc.runtime.quantize import asserts
from ternqc.runtime.quantize.learned import (
    input_quantizer,
    is_ternary,
    learned_activations,
    tracked_weight_thresholds,
    weight_threshold,
)
from ternqc.runtime.quantize.types import module_type
from ternqc.runtime.report import details as report_details
from ternqc.runtime.run import collectives, effects, pipeline
from ternqc.runtime.run.pipeline import ApplyResult, RunSettings, apply

DEFAULT_EPOCHS = 10
DEFAULT_LR = 3e-3
DEFAULT_BATCH_SIZE = 64
DEFAULT_TEMPERATURE = 4.0
@frozen
class FinetuneSettings:
    """How to fine-tune (the `ternqc finetune` options). Checked here, and only here, when made: a value no
    run could use is a `UserError` naming the option (the CLI's and `ternqc.finetune`'s alike)."""

    epochs: int = field(default=DEFAULT_EPOCHS, validator=ranges.validator(ranges.count, "--epochs"))
    lr: float = field(default=DEFAULT_LR, validator=ranges.validator(ranges.positive, "--lr"))
    batch_size: int = field(default=DEFAULT_BATCH_SIZE,
                            validator=ranges.validator(ranges.count, "--train-batch-size"))
    learn_activations: bool = True
    track_weight_thresholds: bool = True
    distill: float = field(default=0.0, validator=ranges.validator(ranges.share, "--distill"))
    temperature: float = field(default=DEFAULT_TEMPERATURE, validator=ranges.validator(ranges.positive, "--temperature"))
    seed: int = 0
    progress: bool = True


@frozen
class EpochRecord:
    """One fine-tuning epoch: mean training loss, validation loss and accuracy after it."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float


@frozen
class FinetuneResult:
    """`result`: as `apply`'s, after fine-tuning; `post_training_accuracy`: the converted model's accuracy
    before fine-tuning; `history`: one record per epoch."""

    result: ApplyResult
    post_training_accuracy: float
    history: tuple[EpochRecord, ...] = field(converter=tuple)


def finetune(
    model: nn.Module, plan: Plan, settings: RunSettings, tune: FinetuneSettings
) -> FinetuneResult:
    """Calibrate and convert `model` as `apply` does, then fine-tune it on the train split.

    `model` is converted and trained in place. Under torch.distributed every process calls this with the
    same arguments; calibration is sharded and merged as in `apply`, training runs data-parallel.

    Raises:
        UserError: as `apply`, or a model with nothing to train.
    """
    teacher = copy.deepcopy(model).eval() if tune.distill > 0 else None
    if settings.dataset is None:
        raise UserError("fine-tuning needs a dataset with a train split: name one (--dataset)")
    data = pipeline.dataset_data(plan, settings, evaluation=True)
    post = apply(model, plan, settings, data=data)
    if not any(is_ternary(m) for m in model.modules()):
        rules = ", ".join(plan.sources) or "of the plan"
        raise UserError(f"nothing to fine-tune: the rules {rules} converted no module of the model to ternary")
    train_ds = build_dataset(settings.dataset, "train")
    val_ds = build_dataset(settings.dataset, "validation")
    history = train_quantized(
        model,
        train_ds,
        val_ds,
        tune,
        teacher=teacher,
        train_name=f"{settings.dataset} train",
        val_name=f"{settings.dataset} validation",
    )
    extra = {
        "post_training_accuracy": post.ternary_accuracy,
        "finetune": {
            **attrs.asdict(tune, filter=lambda a, _: a.name != "progress"),
            "history": [attrs.asdict(h) for h in history],
        },
    }
    result = rebuild_after_training(post, data, plan, extra=extra)
    note = raw_input_note(model)
    if note:
        result = attrs.evolve(result, profile=attrs.evolve(result.profile, notes=(*result.profile.notes, note)))
    return FinetuneResult(result=result, post_training_accuracy=post.ternary_accuracy, history=history)


def train_quantized(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    tune: FinetuneSettings,
    *,
    teacher: nn.Module | None = None,
    train_name: str | None = None,
    val_name: str | None = None,
) -> tuple[EpochRecord, ...]:
    """Train a converted `model` in place (module docstring); it ends in eval mode with refreshed caches.
    A float model trains the same way (a baseline: the same schedule without quantisers).

    Returns:
        One `EpochRecord` per epoch.

    Raises:
        UserError: no trainable parameter, the model rejects the data, or the loss diverged.
    """
    train_shown = train_name or type(train_ds).__name__
    history: list[EpochRecord] = []
    desc = LiveDesc("finetune")
    world, rank = collectives.world_size(), collectives.rank()
    learned = learned_activations(model) if tune.learn_activations else contextlib.nullcontext()
    tracked = tracked_weight_thresholds(model) if tune.track_weight_thresholds else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), threads_for(model), learned, tracked:
        torch.manual_seed(tune.seed)
        shuffle = torch.Generator().manual_seed(tune.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError(f"the model {type(model).__name__} has no trainable parameters")
        net = _data_parallel(model) if world > 1 else model
        optimizer = torch.optim.Adam(params, lr=tune.lr)
        steps = tune.epochs * math.ceil(len(train_ds) / tune.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
        )
        for epoch in progress_bar(range(tune.epochs), total=tune.epochs, desc=desc, enabled=tune.progress and rank == 0):
            model.train()
            total, count = 0.0, 0
            order = torch.randperm(len(train_ds), generator=shuffle)
            for start in range(0, len(order), tune.batch_size):
                global_batch = order[start : start + tune.batch_size]
                share = torch.tensor_split(global_batch, world)[rank]
                inputs, labels = _collate(train_ds, share)
                optimizer.zero_grad(set_to_none=True)
                loss = _loss(net, teacher, inputs, labels, tune, dataset=train_shown)
                # the mean over this share, weighted so DDP's average over processes is the global mean
                (loss * (len(share) * world / len(global_batch))).backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(share)
                count += len(share)
            val_loss, val_acc = loss_and_accuracy(model, val_ds, name=val_name)
            if not math.isfinite(val_loss):
                msg = f"fine-tuning diverged in epoch {epoch}: try a smaller --lr (got {tune.lr})"
                raise UserError(msg)
            history.append(EpochRecord(epoch, total / max(count, 1), val_loss, val_acc))
            desc.text = f"finetune loss {total / max(count, 1):.4f} val_loss {val_loss:.4f} val_acc {val_acc:.4f}"
    model.eval()
    return tuple(history)


def rebuild_after_training(post: ApplyResult, data, plan: Plan, *, extra: dict[str, Any]) -> ApplyResult:
    """`post` (the converted model's `ApplyResult`) brought up to date after its model was trained in place:
    the metrics and activation zero fractions measured again on `data.evaluation`; each module's Δ (data_in's
    learned one, a weight's tracked one) and data_in's learned α taken from the module into its config and into
    the mapped parameters (`<tensor>_threshold`, `data_in_scale`), so `ternary.ckpt`'s configs and
    `quant_config.toml` hold what the model applies; the report rebuilt (with what `apply` recorded about the
    conversion: calls, warnings, notes, tensors whose quantisation cannot take effect) and `extra`'s entries
    added; the plan's assertions checked again on the fine-tuned model. (`--explain` still names the rules that
    set the calibrated values.)"""
    model = post.model
    check = effects.check_model(model, data.calibration[0], data.evaluation)
    metrics, zeros = pipeline._metrics_and_activation_zeros(model, data.evaluation, check.task)
    modules = dict(model.named_modules())
    configs = dict(post.configs)
    mapped = dict(post.mapping.modules)
    for path, mq in post.configs.items():
        module = modules.get(path)
        if module is None or not is_ternary(module):
            continue
        tensors, params = dict(mq.tensors), {}
        found = input_quantizer(module)
        if found is not None and mq.tensor("data_in").quantize:
            delta, alpha = found
            tensors["data_in"] = attrs.evolve(
                mq.tensor("data_in"), delta=delta.tolist(), alpha=None if alpha is None else alpha.tolist()
            )
            params["data_in_threshold"] = delta.tolist()
            if alpha is not None:
                params["data_in_scale"] = alpha.tolist()
        found = weight_threshold(module)
        if found is not None and mq.tensor("weight").quantize:
            tensors["weight"] = attrs.evolve(mq.tensor("weight"), delta=found[0].tolist())
            params["weight_threshold"] = found[0].tolist()
        configs[path] = attrs.evolve(mq, tensors=tensors)
        if path in mapped and params:
            mapped[path] = attrs.evolve(mapped[path], params={**mapped[path].params, **params})
    before = post.report
    calls = {n["path"]: n["calls_per_forward"] for n in before.get("nodes", {}).values() if "calls_per_forward" in n}
    report = pipeline.build_report(
        model, configs, post.float_metrics, metrics, zeros, calls=calls, warnings=post.warnings,
        notes=before.get("notes", ()), headline=before.get("metric"),
    )
    for node, entry in report["nodes"].items():  # tensors apply found could not be quantised stay so reported
        for t, info in before.get("nodes", {}).get(node, {}).get("tensors", {}).items():
            if "not_applied" in info:
                entry["tensors"][t] = info
    mapping = attrs.evolve(post.mapping, modules=mapped)
    applied = asserts.applied_configs(model, configs)
    types = [(name, module_type(m)) for name, m in model.named_modules() if name]
    failures = asserts.check_asserts(plan, mapping, applied, report, post.profile.table, types)
    asserts.annotate_report(report, plan, failures, {}, mapping)
    # the HTML report's details: weights and errors of the fine-tuned model, the calibrated inputs' histograms
    report_details.add_details(report, model, configs, mapping, None, before.get("run", {}))
    report_details.carry_inputs(report, before)
    report.update(extra)
    return attrs.evolve(post, mapping=mapping, configs=configs, ternary_accuracy=report["ternary_accuracy"],
                        ternary_metrics=metrics, report=report, assert_failures=tuple(failures))


def raw_input_note(model: nn.Module) -> str | None:
    """A note when the first ternary Linear/Conv of `model` (module order) quantises its input: usually the raw
    data, which three levels cannot carry and no fine-tuning recovers (`ternary_act.tq` keeps it in float)."""
    for path, module in model.named_modules():
        if weight_threshold(module) is not None:
            if input_quantizer(module) is None:
                return None
            node = module.ternary_config.node
            return (
                f"the input of {path} ({node}), the first ternary layer, is ternary too: if it is the raw "
                f'data, fine-tuning cannot recover what three levels lose; keep it in float with "{path}".'
                "data_in_width = 32"
            )
    return None


def _data_parallel(model: nn.Module) -> nn.Module:
    """`model` wrapped for DistributedDataParallel; buffers are not broadcast (every process computes the same
    ones from the same parameters)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, broadcast_buffers=False)


def _collate(dataset: Dataset, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples `index` of `dataset` stacked into `(inputs, labels)`; an empty index gives empty tensors."""
    items = [dataset[int(i)] for i in index]
    if not items:
        x, y = dataset[0]
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        return x.new_empty((0, *x.shape)), y.new_empty((0, *y.shape))
    inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
    labels = torch.stack([torch.as_tensor(y) for _, y in items])
    return inputs, labels


def _loss(
    net: nn.Module,
    teacher: nn.Module | None,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    tune: FinetuneSettings,
    *,
    dataset: str,
) -> torch.Tensor:
    """Mean cross-entropy over the batch, mixed with distillation from `teacher` when `tune.distill` > 0."""
    if len(labels) == 0:  # a process without samples in the last global batch still joins the all-reduce
        return forward_logits(net, inputs, dataset=dataset).sum() * 0.0
    if teacher is None or tune.distill == 0:
        loss, _ = batch_loss(net, inputs, labels, dataset=dataset)
        return loss
    logits = forward_logits(net, inputs, dataset=dataset)
    ce = F.cross_entropy(logits.float(), labels.reshape(-1).long())
    with torch.no_grad():
        target = forward_logits(teacher, inputs, dataset=dataset).float()
    t = tune.temperature
    kd = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(target / t, dim=1), log_target=True,
                  reduction="batchmean") * (t * t)
    return (1.0 - tune.distill) * ce + tune.distill * kd


__all__ = ["EpochRecord", "FinetuneResult", "FinetuneSettings", "finetune", "train_quantized"]
