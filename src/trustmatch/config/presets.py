"""The shipped configs, generated from one table: dataset settings x methods x label counts.

Each config is a nested mapping of config keys, the shape of a YAML file, so a user YAML can start
from one with ``base: <name>``. A new dataset is one entry in FAMILIES; a new method (a module
registered in ``trustmatch.methods.METHODS``) joins every family that trains all methods of its task
(or all SSL ones).
Every family also gets ``<dataset>-calibratemix-<labels>``: CalibrateMix on SoftMatch, as released.
USB's modern CV benchmark (its ``usb_cv`` configs): ``usb-<dataset>-<method>-<labels>``, pretrained ViTs
fine-tuned with AdamW, layer-wise learning-rate decay, warm-up and cosine (``USB_CV``).
Segmentation: ``digitscenes-<method>`` (CPU-sized; ``digitscenes-csl-notmp`` is CSL without TMP; the
supervised baseline at equal steps, ``digitscenes-supervised`` = ``-steps``, and at equal epochs,
``-epochs``, the releases' protocol) and UniMatch's published Pascal, Cityscapes (its current release)
and COCO settings for every segmentation method (CSL at output stride 8, as published).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trustmatch.methods import METHODS

ALL = tuple(METHODS.for_task("classification"))
SSL = tuple(m for m in ALL if METHODS.get(m).semi_supervised)  # the published tables compare SSL methods only
CALIBRATEMIX_BASE = "softmatch"  # the only variant the authors released


@dataclass(frozen=True)
class Family:
    name: str  # config name, with {method} and {labels}
    title: str  # the dataset as descriptions name it
    classes: int
    labels: tuple[int, ...]  # total labeled images: one config per count
    methods: tuple[str, ...]
    settings: dict[str, Any]  # method.* keys here reach only the methods that read them
    note: str  # the end of each description


def _cpu(dataset: str, steps: int, eval_every: int, **data: Any) -> dict[str, Any]:
    """A small CNN and a step budget that trains in minutes on 2 CPU cores."""
    return {
        "data": {"name": dataset, "strong_ops": 2, **data},  # FixMatch's 2 RandAugment ops per strong view
        # USB's BatchNorm momentum 0.001 is for 2^20 steps: running statistics would lag a short run.
        "model": {"name": "cnn", "bn_momentum": 0.1},
        # FreeMatch/SoftMatch statistics: with 0.999 the EMA horizon 1/(1-m) is 1,000 steps, most of
        # the run, so they would mostly reflect their initial values; 0.99 gives 100 steps (5-7 % of
        # the budget): short against the run, long against batch noise.
        "method": {"ema_m": 0.99},
        # The model EMA: the same reasoning.
        "train": {"steps": steps, "batch_size": 32, "uratio": 7, "ema": 0.99, "eval_every": eval_every},
    }


def _usb(dataset: str, model: str, weight_decay: float = 5e-4) -> dict[str, Any]:
    """USB's published setting: batch 64 + 7x64 unlabeled, SGD 0.03 nesterov, 2^20 steps, EMA 0.999.

    The batch is global, as USB's: any number of processes dividing 64 runs it unchanged, lr included."""
    return {
        "data": {
            "name": dataset,
            "val_per_class": 0,  # "40 labels" means 40 labeled images and nothing more: no validation split
            "include_labeled_in_unlabeled": True,
            "strong_ops": 3,  # USB's strong view: 3 RandAugment ops at random magnitudes, then Cutout
        },
        "model": {"name": model},
        "train": {
            "steps": 2**20,
            "batch_size": 64,
            "uratio": 7,
            "lr": 0.03,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": weight_decay,
            "ema": 0.999,
            "eval_every": 5000,
            "log_every": 100,
        },
    }


_USB_NOTE = "(published USB setting)"
FAMILIES = (  # name, dataset as described, classes, label counts, methods, settings, end of the description
    Family(
        "digits-{method}", "scikit-learn's digits", 10, (40,), ALL,
        _cpu("digits", 1500, 250, val_per_class=5, image_size=16), "CNN at 16 px, 1,500 steps (CPU-sized)",
    ),
    Family(
        "fashionmnist-{method}-{labels}", "Fashion-MNIST", 10, (40, 250), ALL,
        _cpu("fashionmnist", 2000, 500, val_per_class=10), "CNN, 2,000 steps (CPU-sized)",
    ),
    Family(
        "cifar10-{method}-{labels}", "CIFAR-10", 10, (40, 250, 4000), SSL,
        _usb("cifar10", "wrn_28_2"), f"WRN-28-2 {_USB_NOTE}",
    ),
    Family(
        "cifar100-{method}-{labels}", "CIFAR-100", 100, (400, 2500, 10000), SSL,
        _usb("cifar100", "wrn_28_8", weight_decay=1e-3), f"WRN-28-8, wd 1e-3 {_USB_NOTE}",
    ),
    Family(
        "svhn-{method}-{labels}", "SVHN", 10, (40, 250, 1000), SSL,
        _usb("svhn", "wrn_28_2"), f"WRN-28-2 {_USB_NOTE}",
    ),
    Family(
        "stl10-{method}-{labels}", "STL-10", 10, (40, 250, 1000), SSL,
        _usb("stl10", "wrn_37_2"), f"+100k unlabeled, WRN-37-2 at 96 px {_USB_NOTE}",
    ),
)  # fmt: skip


def _usb_cv(
    dataset: str,
    model: str,
    lr: float,
    layer_decay: float,
    crop_ratio: float = 0.875,
    image_size: int | None = None,
    **data: Any,
) -> dict[str, Any]:
    """USB's ``usb_cv`` setting (``config/usb_cv/<method>/<method>_<dataset>_<labels>_0.yaml``): batch 8 + 8
    unlabeled, AdamW (weight decay 5e-4) with layer-wise decay, 204,800 steps with 5,120 of linear warm-up
    (``train.warmup`` 0.025) then USB's cosine, no model EMA (``ema_m: 0``: the trained model is evaluated),
    an evaluation every 2,048 steps, the network at its ImageNet weights; the weak view shifts by up to
    (1 - crop_ratio) of the side. lr, layer decay, network and side are per dataset, as USB's files set them."""
    return {
        "data": {
            "name": dataset,
            "val_per_class": 0,
            "include_labeled_in_unlabeled": True,
            "strong_ops": 3,
            "crop_ratio": crop_ratio,
            "image_size": image_size,
            **data,
        },
        "model": {"name": model, "weights": "imagenet"},
        "train": {
            "steps": 204_800,
            "batch_size": 8,
            "uratio": 1,
            "optimizer": "adamw",
            "lr": lr,
            "layer_decay": layer_decay,
            "weight_decay": 5e-4,
            "warmup": 5_120 / 204_800,
            "ema": 0.0,
            "eval_every": 2_048,
            "log_every": 256,
        },
    }


def _usb_weights_note(model: str) -> str:
    if model.startswith("timm:"):
        return f"{model} at timm's ImageNet weights (USB fine-tunes its own ImageNet-1k checkpoint)"
    return f"USB's {model} (model.weights=<its ImageNet release file>)"


USB_CV = (  # USB's usb_cv: name, dataset, classes, label counts, settings, description
    Family(
        "usb-cifar100-{method}-{labels}", "CIFAR-100", 100, (200, 400), ALL,
        _usb_cv("cifar100", "vit_small_patch2_32", 5e-4, 0.5), "ViT-S/2 at 32 px",
    ),
    Family(
        "usb-stl10-{method}-{labels}", "STL-10", 10, (40, 100), ALL,
        _usb_cv("stl10", "vit_base_patch16_96", 1e-4, 0.65), "+100k unlabeled, ViT-B/16 at 96 px (USB: MAE weights)",
    ),
    Family(
        "usb-eurosat-{method}-{labels}", "EuroSAT", 10, (20, 40), ALL,
        _usb_cv("eurosat", "vit_small_patch2_32", 5e-5, 1.0), "ViT-S/2 at 32 px",
    ),
    Family(
        "usb-tissuemnist-{method}-{labels}", "TissueMNIST", 8, (80, 400), ALL,
        _usb_cv("tissuemnist", "vit_tiny_patch2_32", 5e-5, 0.95, crop_ratio=0.95), "ViT-Ti/2 at 32 px",
    ),
    Family(
        "usb-semi_aves-{method}-{labels}", "Semi-Aves (class folders)", 200, (3959,), ALL,
        _usb_cv(
            "folder", "timm:vit_small_patch16_224", 1e-3, 0.65, image_size=224,
            labels_per_class=0, include_labeled_in_unlabeled=False,
        ),
        "ViT-S/16 at 224 px; data.root=<l_train_val class folders>, data.unlabeled_dir=<u_train_in>, "
        "data.test_dir=<test class folders>, every image of data.root labeled",
    ),
)  # fmt: skip
#: USB's FlexMatch files start without warm-up, except STL-10's (``num_warmup_iter: 0``)
USB_NO_WARMUP = {("flexmatch", name) for name in ("cifar100", "eurosat", "tissuemnist", "semi_aves")}


def _usb_config(family: Family, method: str, labels: int) -> dict[str, Any]:
    config = _config(family, method, labels)
    model = family.settings["model"]["name"]
    config["description"] += f"; {_usb_weights_note(model)} (USB's usb_cv setting)"
    dataset = family.name.split("-")[1]
    if (method, dataset) in USB_NO_WARMUP:
        config["train"] = {**config["train"], "warmup": 0.0}
    if "labels_per_class" in family.settings["data"]:  # a given labeled set (Semi-Aves)
        config["data"]["labels_per_class"] = family.settings["data"]["labels_per_class"]
    return config


def _config(family: Family, method: str, labels: int) -> dict[str, Any]:
    settings, spec = family.settings, METHODS.get(method)
    return {
        "description": f"{spec.description} on {family.title} with {labels} labels, {family.note}",
        **settings,
        "data": {**settings["data"], "labels_per_class": labels // family.classes},
        "method": {"name": method, **{k: v for k, v in settings.get("method", {}).items() if k in spec.Config.keys()}},
    }


def _calibratemix(family: Family, labels: int) -> dict[str, Any]:
    """CalibrateMix as released: on SoftMatch, with the second forward pass."""
    config = _config(family, CALIBRATEMIX_BASE, labels)
    config["description"] = f"CalibrateMix on {config['description']}"
    return {**config, "calibratemix": {"mode": "faithful"}}


SEGMENTATION = tuple(METHODS.for_task("segmentation"))


@dataclass(frozen=True)
class SegFamily:
    """Segmentation configs: ``splits`` maps a split name to (labeled, unlabeled) image counts."""

    name: str  # with {method} and {split}
    title: str
    splits: dict[str, tuple[int, int]]
    epochs: int  # UniMatch counts epochs over the unlabeled set: steps = epochs * ceil(unlabeled / batch)
    settings: dict[str, Any]
    note: str


def _unimatch(
    dataset: str,
    crop: int,
    lr: float,
    head_lr_scale: float,
    model: str,
    method: dict[str, Any] | None = None,
    **data: Any,
) -> dict[str, Any]:
    """UniMatch's published setting: batch 8 labeled + 8 unlabeled (UniMatch's global batch, as
    train.batch_size is: one GPU or any number of torchrun processes dividing 8 runs it unchanged), SGD
    (momentum 0.9, wd 1e-4), poly decay (power 0.9), DeepLabV3+ with an ImageNet encoder at stride 16,
    threshold 0.95 unless ``method`` says otherwise, the trained model itself evaluated (no EMA: train.ema
    0), images decoded in 8 threads."""
    return {
        "task": "segmentation",
        "data": {"name": dataset, "crop_size": crop, "workers": 8, **data},
        # ImageNet weights as released: for the deep-stem ResNet only the release's resnet101.pth has them, so
        # a run without model.weights=/path/to/resnet101.pth stops at once saying so (none: random init, if meant)
        "model": {"name": model, "weights": "imagenet", "output_stride": 16, "bn_momentum": 0.1},
        "method": {"tau": 0.95} if method is None else method,
        "train": {
            "batch_size": 8,
            "uratio": 1,
            "lr": lr,
            "head_lr_scale": head_lr_scale,
            "schedule": "poly",
            "poly_power": 0.9,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 1e-4,
            "ema": 0.0,
            "eval_every": 5000,
            "eval_batch_size": 1,
            "log_every": 100,
        },
    }


def _pascal_splits() -> dict[str, tuple[int, int]]:
    # UniMatch's "original" splits: labeled from the 1,464 fine masks, unlabeled the rest of the
    # 10,582 SBD-augmented set
    return {str(n): (n, 10582 - n) for n in (92, 183, 366, 732, 1464)}


def _fraction_splits(total: int, denominators: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    return {f"1_{d}": (round(total / d), total - round(total / d)) for d in denominators}


#: UniMatch's current Cityscapes release (configs/cityscapes.yaml): every pseudo-label kept (threshold 0, where
#: its first version used 0.95) and the labeled loss OHEM (threshold 0.7, min_kept 200,000 per GPU batch of 2
#: crops, so 100,000 per labeled image here, whatever the processes); CSL trains its Cityscapes with OHEM too
CITYSCAPES_METHOD = {"tau": 0.0, "labeled_loss": "ohem", "ohem_thresh": 0.7, "ohem_min_kept": 100_000}

#: UniMatch's DeepLabV3+ as released (deep-stem ResNet-101, its decoder), which CSL's release builds too
RELEASE_NET = "deeplabv3plus_r101_deepstem"

SEG_FAMILIES = (
    SegFamily(
        "pascal-{method}-{split}", "Pascal VOC 2012 (+SBD)", _pascal_splits(), 80,
        _unimatch("pascal", 321, 0.001, 10.0, RELEASE_NET), "DeepLabV3+ R101, crop 321 (UniMatch setting)",
    ),
    SegFamily(
        "cityscapes-{method}-{split}", "Cityscapes", _fraction_splits(2975, (16, 8, 4, 2)), 240,
        _unimatch("cityscapes", 801, 0.005, 1.0, RELEASE_NET, CITYSCAPES_METHOD, sliding_window=True),
        "DeepLabV3+ R101 at stride 16, crop 801, threshold 0, OHEM labeled loss, sliding-window evaluation "
        "(UniMatch's current release)",
    ),
    SegFamily(
        "coco-{method}-{split}", "COCO (81 classes)", _fraction_splits(118287, (512, 256, 128, 64, 32)), 30,
        _unimatch("coco", 513, 0.004, 10.0, RELEASE_NET),
        "DeepLabV3+ R101, crop 513 (UniMatch setting, which uses Xception-65)",
    ),
)  # fmt: skip


# chosen on validation at 320 labeled scenes (seed 100), trial 0 of 5, rounded (0.3214, 0.6760):
#   trustmatch tune digitscenes-csl data.labeled_images=320 seed=100 train.threads=1 \
#       --space 'method.lambda_u_rampup=0:0.6' --space 'method.lambda_u=0.25:1' --trials 5
CSL_DIGITSCENES = {"lambda_u_rampup": 0.32, "lambda_u": 0.68}


def _digitscenes(method: str, tmp: bool = True) -> dict[str, Any]:
    """Scenes of real handwritten digits, 64 px: a small network trains in minutes on 2 CPU cores.

    The head learns at the encoder's rate (UniMatch's 10x is for an ImageNet-pretrained encoder; this
    one starts from scratch: 4x lowered val mIoU from 0.47 to 0.37). lr 0.025 and 80 labeled scenes,
    chosen on the validation scenes of seed 0 (2,000 steps): at 80 labeled, supervised 0.268 at lr
    0.0125 and 0.298 at 0.025, UniMatch 0.250 and 0.312; with 20 labeled scenes every method stays
    near the all-background 0.12, so 80 is the smallest count that shows the methods apart.
    2,000 UniMatch steps take about 3 minutes on 2 CPU cores.

    CSL's TMP grid keeps the published cell-to-crop ratio rather than the 32-px cell itself: Pascal's
    32-px cells are a tenth of a 321 crop and a part of an object; at 64 px a 32-px cell is a whole
    digit, so the scenes use 8-px cells (8 x 8, a quarter of a digit). ``tmp``: False gives CSL's
    selection in UniMatch's step (two CutMix strong views), the ablation without TMP.

    CSL's unlabeled weight ramps up (``CSL_DIGITSCENES``): from a random start CSL's reliable cluster is
    the more confident of two, so it trusts the background the network predicts everywhere at first, and
    at the published lambda_u = 1 from step 0 a quarter of its unlabeled loss comes from wrong pixels,
    holding the network at background (0.36 validation mIoU at 320 labeled scenes where UniMatch reaches
    0.71). The ramp and weight were chosen on validation (README, CSL).
    """
    spec = METHODS.get(method)
    method_keys: dict[str, Any] = {"ema_m": 0.99} if "ema_m" in spec.Config.keys() else {}
    description = spec.description
    if "tmp" in spec.Config.keys():
        method_keys.update({"tmp": tmp, "tmp_cell": 8} if tmp else {"tmp": False})
        method_keys.update(CSL_DIGITSCENES)
        description += "" if tmp else ", without TMP (UniMatch's two strong views)"
    return {
        "description": f"{description} on digitscenes (80 labeled scenes), small network, 2,000 steps (CPU-sized)",
        "task": "segmentation",
        "data": {"name": "digitscenes", "crop_size": 64, "scenes": 1000, "labeled_images": 80, "val_images": 100},
        "model": {"name": "segnet_small", "bn_momentum": 0.1},
        "method": {"name": method, **method_keys},
        "train": {
            "steps": 2000,
            "batch_size": 8,
            "uratio": 1,
            "lr": 0.025,
            "schedule": "poly",
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 1e-4,
            "ema": 0.99,
            "eval_every": 250,
            "eval_batch_size": 100,
        },
    }


def _digitscenes_supervised_steps() -> dict[str, Any]:
    """The supervised baseline at the semi-supervised presets' step count (``digitscenes-supervised``
    under a name that says so): the same number of labeled batches, so many more passes over them."""
    config = _digitscenes("supervised")
    return {**config, "description": config["description"] + "; equal steps: as many as the SSL presets"}


def _digitscenes_supervised_epochs() -> dict[str, Any]:
    """The supervised baseline as the releases train theirs (UniMatch, CSL): as many epochs over the labeled
    scenes as the semi-supervised presets run over the unlabeled ones (2,000 steps of 8 over 920 unlabeled
    scenes: 17.4 epochs, so 174 steps of 8 over the 80 labeled). The model EMA keeps its horizon's share
    of the run (0.99 is 100 steps, 5 % of 2,000; 0.9 is 10 of 174): at 0.99 the initial weights would still
    weigh 0.99^174 = 17 % in the evaluated model. Evaluations keep their count (every 25 steps)."""
    config = _digitscenes("supervised")
    data, train = config["data"], config["train"]
    batch, labeled = train["batch_size"], data["labeled_images"]
    epochs = train["steps"] / -(-(data["scenes"] - labeled) // batch)
    steps = round(epochs * -(-labeled // batch))
    return {
        **config,
        "description": config["description"].replace("2,000 steps", f"{steps} steps")
        + f"; {epochs:.1f} epochs over the labeled scenes, as many as the SSL presets run over the unlabeled",
        "train": {**train, "steps": steps, "ema": 0.9, "eval_every": 25},
    }


def _segmentation(family: SegFamily, method: str, split: str) -> dict[str, Any]:
    """Steps as UniMatch counts them: epochs over the unlabeled set (over the labeled set when supervised)."""
    labeled, unlabeled = family.splits[split]
    settings, spec = family.settings, METHODS.get(method)
    batch = settings["train"]["batch_size"]
    epoch = unlabeled if spec.semi_supervised else labeled
    model, note = settings["model"], family.note
    if spec.published_backbone is not None:  # the method's own release's (UniMatch's is the family's)
        name, stride, described = spec.published_backbone
        model = {**model, "name": name, "output_stride": stride}
        note += f"; {described}"
    return {
        "description": f"{spec.description} on {family.title}, split {split} ({labeled} labeled), {note}",
        **settings,
        "model": model,
        "data": {**settings["data"], "split": split},
        "method": {"name": method, **{k: v for k, v in settings["method"].items() if k in spec.Config.keys()}},
        "train": {**settings["train"], "steps": family.epochs * -(-epoch // batch)},
    }


PRESETS: dict[str, dict[str, Any]] = {
    family.name.format(method=method, labels=labels): _config(family, method, labels)
    for family in FAMILIES
    for method in family.methods
    for labels in family.labels
}
PRESETS.update(
    {
        family.name.format(method="calibratemix", labels=labels): _calibratemix(family, labels)
        for family in FAMILIES
        for labels in family.labels
    }
)
PRESETS.update(
    {
        family.name.format(method=method, labels=labels): _usb_config(family, method, labels)
        for family in USB_CV
        for method in family.methods
        for labels in family.labels
    }
)
PRESETS.update({f"digitscenes-{method}": _digitscenes(method) for method in SEGMENTATION})
PRESETS["digitscenes-csl-notmp"] = _digitscenes("csl", tmp=False)
PRESETS["digitscenes-supervised"] = _digitscenes_supervised_steps()
PRESETS["digitscenes-supervised-steps"] = _digitscenes_supervised_steps()
PRESETS["digitscenes-supervised-epochs"] = _digitscenes_supervised_epochs()
PRESETS.update(
    {
        family.name.format(method=method, split=split): _segmentation(family, method, split)
        for family in SEG_FAMILIES
        for method in SEGMENTATION
        for split in family.splits
    }
)
