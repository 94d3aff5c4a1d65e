"""A fine-tuning run's settings: LoRA's hyper-parameters and the optimisation's (both part of the run's cache
key, but for the device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from influence.errors import InvalidInputError


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (paper: r=4, alpha=4, dropout 0.05 on query and value).

    target_modules None: the architecture's query and value projections (BERT "query"/"value",
    Llama/Mistral/Qwen "q_proj"/"v_proj", GPT-2 "c_attn"). modules_to_save None: the classification head
    ("classifier" or "score"), trained fully; nothing for causal LM.
    """

    r: int = 4
    alpha: int = 4
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise InvalidInputError(f"LoRA rank must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise InvalidInputError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInputError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        # Lists from JSON become tuples so settings stay hashable and hash the same either way.
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not value:
                    raise InvalidInputError(f"{name} must be a non-empty sequence of module names")
                object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings: AdamW, cosine schedule with linear warm-up, gradient clipping.

    lr: peak learning rate; warmup_ratio: share of all steps spent warming up; max_length: tokens per example.
    device None: CUDA when available, else CPU (not part of the cache key: a run is reusable across devices).
    """

    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 32
    max_length: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    seed: int = 0
    max_grad_norm: float | None = 1.0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InvalidInputError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise InvalidInputError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise InvalidInputError(f"max_length must be >= 2, got {self.max_length}")
        if self.weight_decay < 0:
            raise InvalidInputError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise InvalidInputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InvalidInputError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise InvalidInputError(f"unknown device {self.device!r}") from exc
