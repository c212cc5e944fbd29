"""timm classifiers behind the Output contract, their weights (files, an offline hub cache), USB's ViTs, and the
fine-tuning optimizer: layer-wise decay, warm-up, AdamW, linear probing. Nothing here reaches the network."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from trustmatch.config import TrainConfig
from trustmatch.core.errors import UserError
from trustmatch.core.lr_schedules import cosine_factor
from trustmatch.models import build_model, input_config, is_classifier
from trustmatch.models.timm_models import TimmClassifier
from trustmatch.models.usb_vit import SIZES
from trustmatch.run.optim import build_optimizer, build_scheduler, param_groups

HUB_ID = "timm/test_vit.r160_in1k"  # timm's own test ViT and its hub repository (pretrained_cfg.hf_hub_id)


def tiny_vit(num_classes: int = 3) -> TimmClassifier:
    """A 2-block, 32-wide timm ViT on 32 px (8-px patches)."""
    body = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    return TimmClassifier(body, num_classes)


@pytest.mark.parametrize("name", ["timm:test_vit", "timm:test_resnet", "timm:test_convnext"])
def test_timm_classifier_meets_the_output_contract(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7, 3, image_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    assert out.logits.shape == (3, 7) and out.logits.dtype == torch.float32
    assert out.features.shape == (3, model.num_features)
    torch.testing.assert_close(out.logits, model.head(out.features))
    torch.testing.assert_close(model.forward_features(x), out.features)
    # timm's own pooled pre-logits features of the same network
    body = model.body
    torch.testing.assert_close(out.features, body.forward_head(body.forward_features(x), pre_logits=True))


def test_grayscale_input_and_fixed_size_rebuilt_at_the_data_side() -> None:
    model = build_model("timm:test_vit", 4, 1, image_size=48).eval()
    assert model(torch.randn(2, 1, 48, 48)).logits.shape == (2, 4)
    assert model.body.patch_embed.img_size == (48, 48)


def test_input_config_is_timms_pretrained_config() -> None:
    spec = input_config("timm:test_vit")
    assert (spec.size, spec.mean, spec.std, spec.interpolation, spec.fixed) == (
        160,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        "bicubic",
        True,
    )
    resnet = input_config("timm:resnet50")
    assert resnet.size == 224 and resnet.mean == (0.485, 0.456, 0.406) and not resnet.fixed
    assert input_config("vit_small_patch2_32").size == 32 and input_config("wrn_28_2") is None


def test_usb_vits_have_usbs_sizes() -> None:
    """Parameter counts from USB's definitions: patch embedding, class token and positions, blocks, final norm."""
    for name, s in SIZES.items():
        with torch.device("meta"):  # shapes only: ViT-B's initialisation would cost seconds
            model = build_model(name, 10, 3)
        w, tokens = s.width, (s.side // s.patch) ** 2 + 1
        block = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (4 * w * w + 4 * w) + (4 * w * w + w)
        expected = (3 * s.patch * s.patch * w + w) + w + tokens * w + s.depth * block + 2 * w + (w * 10 + 10)
        assert sum(p.numel() for p in model.parameters()) == expected, name
        assert len(model.body.blocks) == s.depth and model.body.blocks[0].attn.num_heads == s.heads
    with pytest.raises(UserError, match="release file .*vit_small_patch2_32_mlp_im_1k_32.pth"):
        build_model("vit_small_patch2_32", 10, 3, weights="imagenet")


def test_weights_saved_as_safetensors_load_into_a_fresh_model(tmp_path: Path) -> None:
    """The wrapper's own state dict (``body.`` and ``head.`` keys) through model.weights: the same network."""
    torch.manual_seed(0)
    model = build_model("timm:test_vit", 5, 3, image_size=32).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(1)
    other = build_model("timm:test_vit", 5, 3, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(other(x).logits, model(x).logits)
    fresh = build_model("timm:test_vit", 5, 3, image_size=32, weights=str(tmp_path / "model.safetensors")).eval()
    assert torch.equal(fresh(x).logits, model(x).logits) and torch.equal(fresh(x).features, model(x).features)
    assert load_file(tmp_path / "model.safetensors").keys() == model.state_dict().keys()


def _hub_cache(root: Path, state: dict[str, torch.Tensor]) -> Path:
    """``state`` as ``model.safetensors`` of HUB_ID in the Hugging Face cache layout under ``root``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state, snapshot / "model.safetensors")
    return root


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache in offline mode (what HF_HOME=<dir> HF_HUB_OFFLINE=1 set at start-up give)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_imagenet_weights_come_from_an_offline_hub_cache(offline_hub: Path) -> None:
    import timm

    torch.manual_seed(3)
    published = timm.create_model("test_vit")  # as timm publishes it: 160 px, a 1,000-class head
    _hub_cache(offline_hub, published.state_dict())
    model = build_model("timm:test_vit", 10, 3, weights="imagenet")
    body = model.body.state_dict()
    expected = {k: v for k, v in published.state_dict().items() if not k.startswith("head.")}
    assert body.keys() == expected.keys()
    assert all(torch.equal(body[k], v) for k, v in expected.items())
    x = torch.randn(2, 3, 160, 160)
    published.eval(), model.eval()
    torch.testing.assert_close(model(x).features, published.forward_head(published.forward_features(x), True))
    small = build_model("timm:test_vit", 10, 3, image_size=32, weights="imagenet")  # positions resampled by timm
    assert torch.equal(small.body.blocks[0].attn.qkv.weight, published.blocks[0].attn.qkv.weight)


def test_imagenet_weights_offline_without_a_cache_is_one_line(offline_hub: Path) -> None:
    with pytest.raises(UserError) as caught:
        build_model("timm:test_vit", 10, 3, weights="imagenet")
    message = str(caught.value)
    assert "\n" not in message and "timm:test_vit" in message and str(offline_hub) in message
    assert "HF_HUB_OFFLINE=1" in message and "model.weights=none" in message


def test_unknown_timm_name_names_the_closest() -> None:
    with pytest.raises(UserError, match="did you mean timm:resnet50"):
        is_classifier("timm:resnet5O")


def test_layer_decay_groups_by_hand() -> None:
    """Stem d^3, block 0 d^2, block 1 and the final norm d, the head 1 (timm's grouping, USB's optimizer)."""
    model = tiny_vit()
    cfg = TrainConfig(lr=1e-3, weight_decay=0.05, layer_decay=0.5, optimizer="adamw")
    lr_of, decay_of = {}, {}
    for group in param_groups(model, cfg):
        for p in group["params"]:
            lr_of[id(p)], decay_of[id(p)] = group["lr"], group["weight_decay"]
    depth = {"body.cls_token": 3, "body.pos_embed": 3, "body.patch_embed": 3, "body.blocks.0": 2}
    depth.update({"body.blocks.1": 1, "body.norm": 1, "head": 0})
    for name, p in model.named_parameters():
        below = next(d for prefix, d in depth.items() if name.startswith(prefix))
        assert lr_of[id(p)] == pytest.approx(1e-3 * 0.5**below), name
        undecayed = p.ndim == 1 or name in ("body.cls_token", "body.pos_embed")
        assert decay_of[id(p)] == (0.0 if undecayed else 0.05), name
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_layer_decay_matches_timms_own_groups() -> None:
    """The same scales as timm's ``param_groups_layer_decay`` on the same ViT with its own classifier."""
    from timm.optim import param_groups_layer_decay

    torch.manual_seed(0)
    model = tiny_vit()
    plain = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    names = {id(p): n for n, p in plain.named_parameters()}
    timm_scale = {
        names[id(p)]: g["lr_scale"]
        for g in param_groups_layer_decay(plain, layer_decay=0.7, no_weight_decay_list=plain.no_weight_decay())
        for p in g["params"]
    }
    ours = {}
    for group in param_groups(model, TrainConfig(lr=1.0, layer_decay=0.7)):
        ours.update({id(p): group["lr"] for p in group["params"]})
    for name, p in model.named_parameters():
        assert ours[id(p)] == pytest.approx(timm_scale[name.removeprefix("body.")]), name


def test_layer_decay_needs_a_network_with_depths() -> None:
    with pytest.raises(UserError, match="train.layer_decay=0.5 needs a network with layers by depth"):
        param_groups(build_model("cnn", 10, 1), TrainConfig(layer_decay=0.5))


def test_warmup_then_cosine() -> None:
    model = tiny_vit()
    cfg = TrainConfig(lr=0.1, steps=10, warmup=0.2)  # 2 warm-up steps, then USB's cosine over 8
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.0, 0.05] + [0.1 * math.cos(7 * math.pi * k / (16 * 8)) for k in range(8)]
    assert seen == pytest.approx(expected)
    assert expected[5] == pytest.approx(0.1 * cosine_factor(3, 8))


def test_freeze_trains_only_the_head() -> None:
    """Linear probing: after steps, every body weight and BatchNorm statistic is as it was; the head moved."""
    torch.manual_seed(0)
    model = build_model("timm:test_resnet", 4, 3, image_size=32)
    model.freeze_body()
    model.train()
    assert not model.body.training and model.head.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, TrainConfig(lr=0.1, optimizer="adamw", freeze=True))
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.head.parameters()}
    for _ in range(3):
        loss = model(torch.randn(4, 3, 32, 32)).logits.logsumexp(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert any("running_mean" in k for k in after)
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("body."))
    assert not torch.equal(after["head.weight"], before["head.weight"])
