"""Model inputs and outputs in the forms real models use, and what evaluation measures on them: batches of
`(input, label)`, `((inputs...), label)` and dicts (kwargs, `labels` the label); outputs as tensors, tuples and
objects or dicts with `logits`; accuracy, next-token accuracy and perplexity (checked against a computation
written here), a user metric; an output ternqc cannot read fails before calibrating."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ternqc
from ternqc.runtime.calibrate import loop
from ternqc.runtime.errors import UserError
from tests.realmodels import models


class TwoInputs(nn.Module):
    """forward(a, b) -> a tuple whose first element is the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(4, 3), nn.Linear(6, 3)

    def forward(self, a, b):
        return self.fa(a) + self.fb(b), "extra"


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask=None):
        return {"logits": self.fc(x if mask is None else x * mask)}


def _accuracy(model, batches, call):
    right = total = 0
    with torch.no_grad():
        for inputs, labels in batches:
            right += int((call(model, inputs).argmax(1) == labels).sum())
            total += len(labels)
    return right / total


def test_tuple_inputs_and_tuple_outputs():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    g = torch.Generator().manual_seed(2)
    batches = [((torch.randn(8, 4, generator=g), torch.randn(8, 6, generator=g)), torch.randint(0, 3, (8,), generator=g))
               for _ in range(3)]
    want = _accuracy(model, batches, lambda m, i: m(*i)[0])
    report = ternqc.quantize_(model, "weights_only", batches, eval_data=batches)
    assert report.float_accuracy == want and report.metric == "accuracy"
    assert report.ternary_accuracy == _accuracy(model, batches, lambda m, i: m(*i)[0])


def test_dict_batches_go_in_as_keyword_arguments_and_dict_outputs_with_logits():
    torch.manual_seed(0)
    model = DictOut().eval()
    g = torch.Generator().manual_seed(3)
    batches = [{"x": torch.randn(8, 4, generator=g), "mask": torch.ones(8, 4), "labels": torch.randint(0, 3, (8,))}
               for _ in range(3)]
    report = ternqc.quantize_(model, "weights_only", batches, eval_data=batches)
    as_pairs = [({"x": b["x"], "mask": b["mask"]}, b["labels"]) for b in batches]
    assert report.ternary_accuracy == _accuracy(model, as_pairs, lambda m, i: m(**i)["logits"])


def test_language_model_next_token_accuracy_and_perplexity():
    model, batches = models.gpt2(), models.token_batches(n=2)
    report = ternqc.quantize_(model, "weights_only", batches, eval_data=batches)
    loss = correct = count = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            scores, target = logits[:, :-1].reshape(-1, models.VOCAB), b["input_ids"][:, 1:].reshape(-1)
            loss += float(F.cross_entropy(scores, target, reduction="sum"))
            correct += int((scores.argmax(1) == target).sum())
            count += target.numel()
    assert report.metric == "next_token_accuracy"
    assert report.ternary_metrics["next_token_accuracy"] == pytest.approx(correct / count)
    assert report.ternary_metrics["perplexity"] == pytest.approx(math.exp(loss / count), rel=1e-5)
    assert report.float_metrics["perplexity"] != report.ternary_metrics["perplexity"]


def test_a_user_metric_for_anything_else():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    batches = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(3)]  # regression: float targets

    def neg_mse(output, labels):
        return -float(F.mse_loss(output, labels))

    report = ternqc.quantize_(model, "weights_only", batches, eval_data=batches, metric=neg_mse)
    with torch.no_grad():
        want = sum(neg_mse(model(x), y) * len(y) for x, y in batches) / sum(len(y) for _, y in batches)
    assert report.metric == "neg_mse" and report.ternary_accuracy == pytest.approx(want)


class Words(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        self.fc(x)
        return "not scores"


@pytest.mark.parametrize(
    "model, batches, words",
    [
        (Words(), [(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))], ["returned a str", "logits"]),
        (nn.Linear(4, 2), [(torch.randn(4, 4), torch.zeros(4, 3))], ["[4, 2]", "metric"]),
        (nn.Sequential(nn.Linear(4, 4)), [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))],
         ["rejected", "0 (Linear)"]),
    ],
    ids=["no_scores", "labels_do_not_fit", "model_raises"],
)
def test_what_cannot_be_evaluated_fails_before_calibrating(model, batches, words, monkeypatch):
    def no_calibration(*_a, **_k):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(loop, "calibrate", no_calibration)
    with pytest.raises(UserError) as info:
        ternqc.quantize_(model, "weights_only", batches, eval_data=batches)
    for w in words:
        assert w in str(info.value)
