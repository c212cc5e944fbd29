"""Any timm classifier (``model.name=timm:<name>``) behind the project's ``Output(logits, features)`` contract.

timm's model keeps everything up to its pooled pre-logits features (``body``: ``forward_features`` then
``forward_head(pre_logits=True)``, so ConvNeXt's head norm and a ViT's class-token pooling stay timm's); its
own classifier is removed and ``head`` is a fresh ``nn.Linear`` run in float32, as in every classifier here.

Weights (``model.weights``): ``none`` is random initialisation; ``imagenet`` is timm's own pretrained
mechanism (the Hugging Face hub and its cache, ``HF_HOME``, ``HF_HUB_OFFLINE=1``; torch.hub's cache and
``TORCH_HOME`` for weights published by URL). Weights that were asked for and cannot be had are a
``UserError`` naming the model, the cache and the fix: timm itself would log a warning and start from
random initialisation where a model has no pretrained source, which is refused here before timm is asked.

The input a model expects (``input_config``: side, mean/std, interpolation) comes from timm's pretrained
config without building the model, so the data pipeline can be set up before the network exists.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trustmatch.core.errors import UserError
from trustmatch.models.output import Output, float32_head

PREFIX = "timm:"
WEIGHTS = ("none", "imagenet")


@dataclass(frozen=True)
class InputConfig:
    """What a network's weights were trained on: the data pipeline follows it (``data.image_size`` when unset,
    normalisation, resize interpolation). ``fixed`` networks (ViTs' position embeddings) are built at the
    data's side instead, timm resampling pretrained position embeddings to it."""

    size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    interpolation: str
    fixed: bool


class TimmClassifier(nn.Module):
    """timm's network up to its pooled features (``body``), then ``dropout`` and a float32 ``head``.

    ``freeze_body()`` is linear probing: the body's parameters stop requiring gradients and the body stays
    in eval mode whatever ``train()`` is called with, so neither weights nor BatchNorm statistics move.
    """

    def __init__(self, body: nn.Module, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = body
        self.num_features = int(body.num_features)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_features, num_classes)
        self.frozen = False

    def forward_features(self, x: Tensor) -> Tensor:
        return self.drop(self.body.forward_head(self.body.forward_features(x), pre_logits=True))

    def forward(self, x: Tensor) -> Output:
        features = self.forward_features(x)
        return Output(float32_head(self.head, features), features)

    def freeze_body(self) -> None:
        self.frozen = True
        self.body.requires_grad_(False)
        self.body.eval()

    def train(self, mode: bool = True) -> TimmClassifier:
        super().train(mode)
        if self.frozen:
            self.body.eval()
        return self

    def layer_ids(self) -> dict[str, int]:
        """Each parameter's depth for layer-wise learning-rate decay, by timm's own grouping of the body
        (``group_matcher``: stem 0, then each block; a model without one falls back to timm's automatic
        grouping); the head sits one above the last block, where timm's ``param_groups_layer_decay`` puts the
        classifier its grouping does not match (so the head learns at ``lr`` and the last block at
        ``lr * layer_decay``, as in timm and USB)."""
        from timm.models import group_parameters
        from timm.optim._param_groups import auto_group_layers

        if hasattr(self.body, "group_matcher"):
            body = group_parameters(self.body, self.body.group_matcher(coarse=False), reverse=True)
        else:
            body = auto_group_layers(self.body)
        head = max(body.values(), default=-1) + 1
        ids = {f"body.{name}": layer for name, layer in body.items()}
        return {**ids, **{f"head.{name}": head for name, _ in self.head.named_parameters()}}

    def no_weight_decay(self) -> set[str]:
        """The body's own undecayed parameters (a ViT's position embedding and class token), as USB and timm."""
        names = self.body.no_weight_decay() if hasattr(self.body, "no_weight_decay") else set()
        return {f"body.{name}" for name in names}


def _split(name: str) -> tuple[str, str]:
    from timm.models import split_model_name_tag

    return split_model_name_tag(name)


def check_name(name: str) -> str:
    """The timm architecture of ``timm:<name>`` (a ``.tag`` allowed), or one line naming the closest names."""
    import timm

    arch, _ = _split(name)
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise UserError(
            f'model.name={PREFIX}{name}: timm has no model {arch!r}{hint} (python -c "import timm; '
            f"print(timm.list_models('*{arch.split('_')[0]}*'))\" lists them)"
        )
    return arch


def input_config(name: str) -> InputConfig:
    """timm's pretrained config of ``name`` (its default tag unless one is given), without building it."""
    from timm.models import get_pretrained_cfg

    check_name(name)
    cfg = get_pretrained_cfg(name)
    if cfg is None:  # an architecture without any pretrained config: timm's defaults
        return InputConfig(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", False)
    return InputConfig(
        int(cfg.input_size[-1]),
        tuple(cfg.mean),
        tuple(cfg.std),
        cfg.interpolation or "bilinear",
        bool(cfg.fixed_input_size),
    )


def weights_source(name: str) -> tuple[str, str]:
    """(where timm would fetch ``name``'s pretrained weights from, the cache they land in), or one line
    saying that timm has none for it (timm would otherwise warn and start from random initialisation)."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        return f"the Hugging Face hub ({cfg.hf_hub_id})", constants.HF_HUB_CACHE
    if cfg is not None and cfg.url:
        return cfg.url, os.path.join(torch.hub.get_dir(), "checkpoints")
    raise UserError(
        f"model.weights=imagenet: timm has no pretrained weights for {name}; use model.weights=none, a weights "
        f"file, or another tag (python -c \"import timm; print(timm.list_pretrained('{_split(name)[0]}*'))\")"
    )


def create(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    bn_momentum: float | None = None,
    dropout: float = 0.0,
    image_size: int | None = None,
    weights: str = "none",
) -> TimmClassifier:
    """``timm.create_model(name)`` without its classifier, wrapped; ``image_size`` rebuilds a fixed-size network
    (a ViT's position embeddings) at that side, which timm's loader resamples pretrained embeddings to."""
    import timm

    if weights not in WEIGHTS:
        raise ValueError(f"timm factory weights must be one of {WEIGHTS} (files load elsewhere), got {weights!r}")
    config = input_config(name)
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_channels}
    if config.fixed and image_size is not None and image_size != config.size:
        kwargs["img_size"] = image_size
    pretrained = weights == "imagenet"
    source, cache = weights_source(name) if pretrained else ("", "")
    try:
        body = timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as e:  # huggingface_hub's cache misses and network errors, torch.hub's URL errors
        offline = ", HF_HUB_OFFLINE=1" if _offline() else ""
        raise UserError(
            f"model.weights=imagenet: {PREFIX}{name}'s weights are not in the cache {cache} and could not be "
            f"fetched from {source} ({type(e).__name__}{offline}); fetch them once where the network is reachable "
            f"with the same HF_HOME / TORCH_HOME, or use model.weights=none"
        ) from None
    if bn_momentum is not None:
        for module in body.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    return TimmClassifier(body, num_classes, dropout)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())
