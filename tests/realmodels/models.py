"""Real architectures for the tests, each built tiny with random weights (no download), with batches of
data in the form the architecture takes, and an independent reference of weights-only ternary quantisation.

Factories take no arguments (`--model tests/realmodels/models.py:gpt2`, and `load_ternary_checkpoint`'s
builder). The reference ternarises weights with numpy, written here from the recipe's definition
(`configs/weights_only.tq`: per output channel Δ = 0.7·mean|W[c]|, α = mean of |W[c]| over |W[c]| > Δ),
and runs the model with PyTorch's fused fast paths turned off.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, SEQ = 100, 12


# --- models ------------------------------------------------------------------------------------------------


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=VOCAB, num_labels=3)
    return BertForSequenceClassification(config).eval()


class EncoderNet(nn.Module):
    """`nn.TransformerEncoder` (batch first: eligible for the fused fast path in eval) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return EncoderNet().eval()


class BasicBlock(nn.Module):
    """A ResNet-style basic block, written here: its one `relu` module is called twice per forward."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class BlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = BasicBlock(4)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).flatten(1))


def block() -> nn.Module:
    torch.manual_seed(0)
    return BlockNet().eval()


class MyLinear(nn.Linear):
    """A user's Linear subclass with its own forward."""

    def forward(self, x):
        return super().forward(x) + 0.5


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = MyLinear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = MyLinear(16, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def subclass() -> nn.Module:
    torch.manual_seed(0)
    return SubclassNet().eval()


# --- data --------------------------------------------------------------------------------------------------


def token_batches(n: int = 4, batch: int = 4, labels: bool = False, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        item = {"input_ids": torch.randint(0, VOCAB, (batch, SEQ), generator=g),
                "attention_mask": torch.ones(batch, SEQ, dtype=torch.long)}
        if labels:
            item["labels"] = torch.randint(0, 3, (batch,), generator=g)
        out.append(item)
    return out


def tensor_batches(shape: tuple[int, ...], classes: int, n: int = 4, batch: int = 8, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


class TokenDataset(torch.utils.data.Dataset):
    """Dict items, as Hugging Face datasets give them: `input_ids`, `attention_mask` (no labels: a causal LM
    predicts its input)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long)}


def tokens(split: str) -> torch.utils.data.Dataset:
    """Dataset factory for the CLI: 24 token sequences per split."""
    return TokenDataset(24, {"train": 0, "validation": 1, "test": 2}[split])


def sequences(split: str) -> torch.utils.data.Dataset:
    """Dataset factory for the CLI: 24 `[5, 16]` sequences with 3 classes."""
    g = torch.Generator().manual_seed({"train": 0, "validation": 1, "test": 2}[split])
    return torch.utils.data.TensorDataset(torch.randn(24, 5, 16, generator=g), torch.randint(0, 3, (24,), generator=g))


ARCHITECTURES = {
    "gpt2": (gpt2, lambda: token_batches()),
    "bert": (bert, lambda: token_batches(labels=True)),
    "encoder": (encoder, lambda: tensor_batches((5, 16), 3)),
    "block": (block, lambda: tensor_batches((3, 6, 6), 2)),
    "subclass": (subclass, lambda: tensor_batches((8,), 3)),
}


# --- the independent reference ----------------------------------------------------------------------------


def linear_like(model: nn.Module) -> dict[str, nn.Module]:
    """Every module the test calls linear-like: nn.Linear and subclasses, transformers' Conv1D."""
    return {p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def weighted(model: nn.Module) -> dict[str, nn.Module]:
    """What `weights_only.tq` quantises: linear-like modules and convolutions."""
    return {p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d))}


def ternarise_per_channel(w: np.ndarray) -> np.ndarray:
    """weights_only.tq by its definition: per output channel (axis 0) Δ = 0.7·mean|W[c]|, α = mean of |W[c]|
    over |W[c]| > Δ; q = α·sign(W) where |W| > Δ, else 0."""
    w = w.astype(np.float64)
    axes = tuple(range(1, w.ndim))
    a = np.abs(w)
    delta = 0.7 * a.mean(axis=axes, keepdims=True)
    mask = a > delta
    alpha = np.where(mask.sum(axis=axes, keepdims=True) > 0,
                     (a * mask).sum(axis=axes, keepdims=True) / np.maximum(mask.sum(axis=axes, keepdims=True), 1), 0)
    return (np.sign(w) * mask * alpha).astype(np.float32)


def weights_only_reference(float_model: nn.Module) -> nn.Module:
    """A copy of the float model with every weight `weights_only.tq` quantises replaced by its numpy
    ternarisation (Conv1D's `[in, out]` weight per output feature). A weight tied to another module
    (GPT-2's lm_head and wte) gets its own Parameter, so the other module keeps reading the float one."""
    ref = copy.deepcopy(float_model)
    for _, m in weighted(ref).items():
        w = m.weight.detach().numpy()
        q = ternarise_per_channel(w.T).T if isinstance(m, Conv1D) else ternarise_per_channel(w)
        m.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(q)))
    return ref.eval()


def run(model: nn.Module, batches: list, *, fast_path: bool = True) -> list[torch.Tensor]:
    """The model's scores on each batch, in eval mode without gradients (the fused paths on or off)."""
    from ternqc.runtime.models.batches import call_model, model_logits, split_batch

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fast_path)
    try:
        with torch.no_grad():
            return [model_logits(call_model(model.eval(), split_batch(b)[0])).clone() for b in batches]
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
