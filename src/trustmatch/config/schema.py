"""The run's typed configuration: one dataclass per section, every key a field with its help.

The ``method`` section is the chosen method's own dataclass (``trustmatch.methods``), so a method's
keys, defaults and ranges are written once, in the method's module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trustmatch.core.options import opt
from trustmatch.methods import MethodConfig, method_config
from trustmatch.methods.calibratemix import CalibrateMixConfig

DEFAULT_METHOD = "fixmatch"
NONFINITE_POLICIES = ("stop", "skip")
PREFETCH_MODES = ("auto", "on", "off")
PIXEL_TEMPERATURES = ("scalar", "per_class", "off")
OPTIMIZERS = ("sgd", "adamw")
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass
class DataConfig:
    name: str = opt(
        "digits",
        "dataset: digits, fashionmnist, mnist, cifar10, cifar100, svhn, stl10, folder; "
        "segmentation: digitscenes, pascal, cityscapes, coco, folder",
    )
    root: str | None = opt(None, "dataset directory (torchvision or standard layout) or the user's folder")
    download: bool = opt(False, "only on request: nothing is fetched unless this is true")
    labels_per_class: int = opt(
        4, "labeled images per class drawn from the training pool (0: all of it, a given labeled set: Semi-Aves)"
    )
    val_per_class: int = opt(5, "labeled validation split held out of the training pool")
    image_size: int | None = opt(
        None, "square side images are resized to (None: the dataset's native size; folders: 32)"
    )
    unlabeled_dir: str | None = opt(None, "folder dataset: a folder of unlabeled images, searched recursively")
    test_dir: str | None = opt(
        None, "folder dataset: optional test folder (classification: class subfolders; segmentation: images/ + masks/)"
    )
    val_dir: str | None = opt(None, "segmentation folder: optional validation folder with images/ + masks/")
    split: str | None = opt(None, "segmentation: UniMatch split name under <root>/splits/ (92, 1464, 1_16 ...)")
    split_dir: str | None = opt(
        None, "segmentation: folder with labeled.txt and unlabeled.txt (None: <root>/splits/<split>); val.txt beside it"
    )
    crop_size: int = opt(64, "segmentation: training crop side (Pascal 321, Cityscapes 801, COCO 513)")
    sliding_window: bool = opt(False, "segmentation: evaluate in crop-sized windows (stride 2/3 crop; Cityscapes)")
    workers: int = opt(0, "segmentation: threads that decode and crop images from files (0: the main thread)")
    scenes: int = opt(1000, "digitscenes: training scenes generated (the labeled + unlabeled pool)")
    labeled_images: int = opt(80, "digitscenes: labeled scenes drawn from the pool")
    val_images: int = opt(100, "digitscenes: validation scenes (generated apart from the pool)")
    test_fraction: float = opt(0.2, "share held out as a fixed, stratified test split when the dataset has none")
    include_labeled_in_unlabeled: bool = opt(False, "also use the labeled images as unlabeled ones (USB does)")
    strong_ops: int = opt(2, "RandAugment ops per strong view (FixMatch: 2; USB's published configs: 3)")
    crop_ratio: float = opt(
        0.875,
        "weak view: a random shift of up to (1 - crop_ratio) of the side with reflect padding, USB's "
        "RandomCrop(size, padding=size * (1 - crop_ratio)) (FixMatch and USB: 0.875; USB's TissueMNIST: 0.95)",
    )
    interpolation: str | None = opt(
        None, "resize filter when images are decoded: bilinear or bicubic (None: the timm model's, else bilinear)"
    )
    strong_magnitude: float | None = opt(
        None,
        "None: each op's magnitude uniform over its range, per image (FixMatch, USB); "
        "a number in [0, 1]: every op at that fixed strength, RandAugment-style",
    )
    cache: str = opt(
        "auto",
        "classification images: 'memory' (decoded into RAM), 'disk' (decoded once into a memory-mapped file "
        "under data.cache_dir, reused by later runs, rebuilt when the files change), 'auto' (disk when the "
        "decoded images times the processes on this machine exceed half the available memory); digits is "
        "always in memory, segmentation decodes per batch",
    )
    cache_dir: str | None = opt(
        None, "folder of the decoded-image cache (None: $TRUSTMATCH_CACHE/decoded or ~/.cache/trustmatch/decoded)"
    )


@dataclass
class ModelConfig:
    name: str = opt(
        "cnn",
        "network: cnn, wrn_28_2, wrn_28_8, wrn_37_2, USB's vit_tiny_patch2_32, vit_small_patch2_32, "
        "vit_base_patch16_96, or timm:<any timm model> (timm:resnet50, timm:vit_small_patch16_224); segmentation: "
        "segnet_small, deeplabv3plus_r50, _r101 (smp's ResNet), deeplabv3plus_r50_deepstem, _r101_deepstem "
        "(UniMatch's network as released), smp:<encoder> (DeepLabV3+ on any segmentation-models-pytorch encoder: "
        "smp:resnet34, smp:efficientnet-b0, smp:tu-<timm>)",
    )
    weights: str = opt(
        "none",
        "initial weights: none (random init), imagenet (the library's download, timm's or smp's, from its cache: "
        "HF_HOME, HF_HUB_OFFLINE=1 offline; an error if they cannot be had), or a .pth/.pt/.safetensors/.bin file "
        "or a trustmatch run's best.pt/last.pt (a new run from a trained model); only the head may differ: a "
        "classifier's head of another size starts fresh, a segmentation head of another size is an error",
    )
    weights_prefix: str = opt(
        "", "load only the weights file's keys under this prefix, stripped (module., backbone. ... go by themselves)"
    )
    output_stride: int = opt(16, "DeepLabV3+ encoder output stride: 16 (UniMatch) or 8 (CSL)")
    bn_momentum: float = opt(
        0.001, "BatchNorm momentum (PyTorch convention); 0.001 as USB for 2^20-step runs, ~0.1 for short ones"
    )
    dropout: float = opt(0.0, "dropout rate inside the network")


@dataclass
class TrainConfig:
    steps: int = opt(1000, "optimisation steps (the learning-rate schedule spans them)")
    batch_size: int = opt(64, "labeled images per step, all processes together (torchrun: each takes 1/N)")
    uratio: int = opt(7, "unlabeled batch = uratio * batch_size")
    optimizer: str = opt("sgd", "sgd (momentum, nesterov) or adamw (USB's usb_cv fine-tuning; betas 0.9, 0.999)")
    lr: float = opt(0.03, "learning rate at step 0 (after any warm-up)")
    schedule: str = opt(
        "cosine", "learning-rate schedule: cosine (FixMatch: lr0·cos(7πk/16K)) or poly (UniMatch: lr0·(1−k/K)^power)"
    )
    warmup: float = opt(
        0.0, "fraction of train.steps with a linear learning-rate warm-up from 0, the schedule after it (USB: 0.025)"
    )
    layer_decay: float = opt(
        1.0,
        "layer-wise learning-rate decay: a layer d below the top learns at lr·layer_decay^d (timm's grouping of "
        "timm:<name> and USB's ViTs; 1: off; USB's usb_cv: 0.5-0.95)",
    )
    freeze: bool = opt(False, "linear probing: only the classifier head trains; the backbone (BatchNorm too) stays")
    poly_power: float = opt(0.9, "exponent of the poly schedule (UniMatch: 0.9)")
    head_lr_scale: float = opt(1.0, "learning-rate multiplier for the model's head (UniMatch: 10 for the decoder)")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "weight decay on conv/linear weights (not BatchNorm, not biases)")
    ema: float = opt(0.999, "model EMA for evaluation (buffers copied from the live model)")
    eval_every: int = opt(250, "steps between evaluations (and last.pt saves)")
    save_every: int = opt(0, "steps between extra last.pt saves without evaluation (0: only at evaluations)")
    nonfinite: str = opt(
        "stop",
        "a non-finite loss: 'stop' the run (naming the step and the last good checkpoint), or 'skip' the "
        "step (no update; selector, trackers and BatchNorm statistics restored) and count it",
    )
    evaluate_test: bool = opt(
        True,
        "evaluate the test split at each evaluation and at the end; false: validation only, the test split "
        "is never evaluated (`trustmatch tune`'s trials; a dataset held in memory may still load it)",
    )
    eval_batch_size: int = opt(512, "images per evaluation forward, per process (a memory knob, not a training knob)")
    log_every: int = opt(50, "steps between logged training averages")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    amp: bool = opt(
        True,
        "bfloat16 autocast where the device runs it natively (CUDA; CPUs with AVX-512 BF16 or AMX); "
        "false keeps float32",
    )
    channels_last: bool = opt(True, "channels-last memory format (CUDA, and the CPU when amp applies)")
    compile: bool = opt(False, "torch.compile the whole training step (forward, selection, losses and their backward)")
    cuda_graphs: bool = opt(
        False, "CUDA: compile the step and replay it as CUDA graphs (refused where a setting keeps it from capture)"
    )
    threads: int | None = opt(None, "torch intra-op threads on CPU (None: torch's default)")
    prefetch: str = opt(
        "auto",
        "build the next batch in a background thread while the step runs (pinned memory and a side stream on "
        "CUDA, where it also holds the next batch in GPU memory): on, off, or auto (on on the CPU; off with CUDA "
        "until measured there, and on MPS)",
    )


@dataclass
class EvalConfig:
    pixel_temperature: str = opt(
        "scalar",
        "segmentation: post-hoc temperature fitted on (a sample of 2^20) validation pixels: scalar (one T), "
        "per_class (class c's logits divided by T_c; may change a pixel's class) or off",
    )


@dataclass
class Config:
    description: str = opt("", "one line shown by `trustmatch list`")
    seed: int = opt(0, "fixes the labeled/validation split, the initialisation and the data order")
    task: str = opt("classification", "what is learned: classification or segmentation")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=lambda: method_config(DEFAULT_METHOD))  # the named method's class
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    calibratemix: CalibrateMixConfig = field(default_factory=CalibrateMixConfig)

    def to_dict(self) -> dict[str, Any]:
        """Every key but the method keys this method does not read, which ``from_dict`` would reject."""
        values = dataclasses.asdict(self)
        reads = self.method.keys(self.task)
        values["method"] = {k: v for k, v in values["method"].items() if k == "name" or k in reads}
        return values
