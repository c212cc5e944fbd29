"""USB's ViTs for small images (its ``usb_cv`` benchmark), built as timm ``VisionTransformer``s with USB's sizes.

timm has no ViT with 2-pixel patches on 32-pixel images, nor a ViT-B/16 at 96 px; USB defines them
(``semilearn/nets/vit/vit.py``) as the standard ViT (class-token pooling, qkv bias, MLP ratio 4, LayerNorm
eps 1e-6, which are timm's defaults too) with these sizes:

====================  ====  =====  =====  =====  =====  =========
name                  side  patch  width  depth  heads  drop path
====================  ====  =====  =====  =====  =====  =========
vit_tiny_patch2_32    32    2      192    12     3      0.1
vit_small_patch2_32   32    2      384    12     6      0.2
vit_base_patch16_96   96    16     768    12     12     0.2
====================  ====  =====  =====  =====  =====  =========

The parameter names are timm's (and USB's), under ``body.``. USB initialises them from its own ImageNet
checkpoints, published as release files (:data:`RELEASE`), not through timm or the hub: ``model.weights=imagenet``
cannot fetch them, so it says where they are and how to pass the file instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from trustmatch.core.errors import UserError
from trustmatch.models.timm_models import InputConfig, TimmClassifier

RELEASE_URL = "https://github.com/microsoft/Semi-supervised-learning/releases/download/v.0.0.0/"


class ViTSize(NamedTuple):
    side: int
    patch: int
    width: int
    depth: int
    heads: int
    drop_path: float
    release: str  # USB's ImageNet checkpoint (its configs' pretrain_path)


SIZES = {
    "vit_tiny_patch2_32": ViTSize(32, 2, 192, 12, 3, 0.1, "vit_tiny_patch2_32_mlp_im_1k_32.pth"),
    "vit_small_patch2_32": ViTSize(32, 2, 384, 12, 6, 0.2, "vit_small_patch2_32_mlp_im_1k_32.pth"),
    "vit_base_patch16_96": ViTSize(96, 16, 768, 12, 12, 0.2, "mae_pretrain_vit_base.pth"),
}
#: USB's ImageNet checkpoint of each network (its MAE ViT-B for STL-10), by URL
RELEASE = {name: RELEASE_URL + size.release for name, size in SIZES.items()}


def input_config(name: str) -> InputConfig:
    """The side the position embeddings are built for; normalisation stays the dataset's (as USB's loaders)."""
    return InputConfig(SIZES[name].side, None, None, "bilinear", True)


def refuse_imagenet(name: str) -> None:
    raise UserError(
        f"model.weights=imagenet: USB's ImageNet weights for {name} are its release file {RELEASE[name]}, not "
        f"fetched here; download it and pass model.weights=<path to {SIZES[name].release}>"
    )


def _factory(name: str) -> Callable[..., TimmClassifier]:
    size = SIZES[name]

    def factory(
        num_classes: int,
        in_channels: int = 3,
        bn_momentum: float | None = None,
        dropout: float = 0.0,
        image_size: int | None = None,
        weights: str = "none",
    ) -> TimmClassifier:
        from timm.models.vision_transformer import VisionTransformer

        if weights != "none":
            refuse_imagenet(name)
        body = VisionTransformer(
            img_size=image_size or size.side,
            patch_size=size.patch,
            in_chans=in_channels,
            num_classes=0,
            embed_dim=size.width,
            depth=size.depth,
            num_heads=size.heads,
            drop_path_rate=size.drop_path,
        )
        return TimmClassifier(body, num_classes, dropout)

    factory.__name__ = name
    factory.__doc__ = f"USB's {name} ({size.width} wide, {size.depth} deep, {size.patch}-px patches on {size.side} px)."
    return factory


vit_tiny_patch2_32 = _factory("vit_tiny_patch2_32")
vit_small_patch2_32 = _factory("vit_small_patch2_32")
vit_base_patch16_96 = _factory("vit_base_patch16_96")
