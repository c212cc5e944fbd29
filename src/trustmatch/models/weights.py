"""Initial weights from where users have them: a local file, or a library's ImageNet download.

``load_weights(model, source, prefix, head)`` loads a ``.pth`` / ``.pt`` / ``.bin`` file (``torch.load``
with ``weights_only=True``: a pickle that would run code is refused), a ``.safetensors`` file, or a
trustmatch run's ``best.pt`` / ``last.pt`` (its EMA weights: the model it evaluated) into ``model``. The
state dict may be nested under ``state_dict`` / ``model``; prefixes every key shares (``module.`` from DDP,
``_orig_mod.`` from torch.compile, ``model.``, ``backbone.``, ``encoder.``) are stripped, and ``prefix``
first keeps only the keys under it (stripped too). The keys go into the whole model or into the one child
module they fit best (an ImageNet ResNet file into a DeepLabV3+'s ``encoder``, a plain timm file into a
``timm:<name>`` classifier's ``body``).

Why so strict: a file that silently half-loads trains a model the user did not ask for. Only the head
may differ: the model's ``head`` may be absent from the file (a backbone file: the head keeps its random
init), and the file may carry a classifier the model lacks (an ImageNet ``fc``); anything else missing,
unexpected or of another shape (a wrong architecture) is a ``UserError`` naming the file, raised before the
model is changed. A head trained for other classes is an error for a segmentation network (its head is the
whole decoder: ``model.weights_prefix=encoder.`` says to drop it), while a classifier's (one linear layer,
``fresh_head``) is left out and starts fresh, which is what fine-tuning on new classes wants. A load prints
what it loaded and the missing and unexpected keys, one line each, and a head left out (main process only).

The ImageNet downloads are the libraries' own (smp and timm through huggingface_hub, so ``HF_HOME`` /
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` apply); ``hub_failure`` turns their failure into one line that
names the cache.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from trustmatch.core import distributed as dist
from trustmatch.core.errors import UserError

__all__ = ["SUFFIXES", "LoadReport", "check_source", "hub_failure", "load_weights", "read_state_dict"]

SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
#: stripped while every key starts with one of them
WRAPPERS = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
#: module names of a source's classifier, which the model may lack (ImageNet's ``fc``)
CLASSIFIER_NAMES = frozenset({"fc", "classifier", "head", "last_linear", "logits"})
SHOWN = 6  # keys (or module groups) a line names


class LoadReport(NamedTuple):
    path: Path
    into: str  # "" (the whole model) or the child module the keys went into ("encoder")
    loaded: int  # tensors loaded
    missing: list[str]  # model keys the file lacked (left at their initialisation)
    unexpected: list[str]  # file keys the model has no place for (ignored)
    left_out: list[str]  # the file's head, of another shape than a classifier's: that head starts fresh


def check_source(source: str | Path, key: str = "model.weights") -> None:
    """Fail fast, before data is loaded, on a path that is not a readable weights file."""
    if str(source) in ("none", "imagenet"):
        return
    path = Path(source).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(
            f"{key}={source}: the file {what}; give a {'/'.join(SUFFIXES)} file (or a run's best.pt / last.pt), "
            "'imagenet' or 'none'"
        )
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{key}={source}: {path.suffix or 'no suffix'} is not a weights file: use one of {SUFFIXES}")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file or trustmatch checkpoint, unnested; one line for anything else."""
    check_source(path)
    path = Path(path).expanduser()
    obj = _read(path)
    if isinstance(obj, dict) and isinstance(obj.get("parts"), dict) and "version" in obj:  # a trustmatch run's
        parts = obj["parts"]
        obj = parts.get("ema", parts.get("model"))
    for _ in range(3):
        if isinstance(obj, dict) and not _all_tensors(obj):
            nested = [k for k in ("state_dict", "model", "ema") if isinstance(obj.get(k), dict)]
            if nested:
                obj = obj[nested[0]]
    if not isinstance(obj, dict) or not obj or not _all_tensors(obj):
        held = type(obj).__name__ if not isinstance(obj, dict) else _describe_values(obj)
        raise UserError(
            f"weights file {path} holds no state dict (a mapping of names to tensors, possibly under 'state_dict' "
            f"or 'model') but {held}: save model.state_dict(), not the model or a training state"
        )
    return obj


def _read(path: Path) -> Any:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # a truncated or foreign file: SafetensorError, OSError ...
            raise UserError(
                f"weights file {path} is unreadable or truncated ({_first_line(e)}): get it again"
            ) from None
    if zipfile.is_zipfile(path):  # torch.save's format: its CRC-32s catch a damaged tensor torch.load would read
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise UserError(f"weights file {path} is unreadable or truncated ({e}): get it again") from None
        if damaged is not None:
            raise UserError(f"weights file {path} is damaged ({damaged} fails its CRC-32 check): get it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        if "Unsupported global" not in str(e):  # bytes that are no pickle at all: "Unsupported operand 110"
            raise UserError(f"weights file {path} is unreadable or truncated ({detail}): get it again") from None
        raise UserError(
            f"weights file {path} was refused: it holds objects other than tensors and plain data "
            f"(a pickled {detail}); save model.state_dict() (only load files you trust)"
        ) from None
    except Exception as e:  # truncated or not a torch file at all: zip, pickle, EOF, unicode errors
        raise UserError(f"weights file {path} is unreadable or truncated ({_first_line(e)}): get it again") from None


def _unpickler_detail(e: BaseException) -> str:
    """What torch's weights-only unpickler objected to, without its paragraph of advice."""
    text = " ".join(str(e).split())
    for marker in ("Unsupported global: GLOBAL ", "WeightsUnpickler error: "):
        if marker in text:
            return text.split(marker, 1)[1].split(" was not an allowed global")[0].split(" Check the ")[0][:160]
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _all_tensors(d: dict[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in d.items())


def _describe_values(d: dict[Any, Any]) -> str:
    others = sorted({type(v).__name__ for v in d.values() if not isinstance(v, Tensor)})
    return f"a mapping of {', '.join(others) or 'nothing'} values" if d else "an empty mapping"


def _strip(state: dict[str, Tensor], prefix: str, path: Path) -> dict[str, Tensor]:
    if prefix:
        kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not kept:
            raise UserError(
                f"model.weights_prefix={prefix!r}: no key of {path} starts with it (its keys start with "
                f"{', '.join(sorted({k.split('.')[0] + '.' for k in state})[:SHOWN])})"
            )
        state = kept
    while True:
        shared = [w for w in WRAPPERS if all(k.startswith(w) for k in state)]
        if not shared:
            return state
        state = {k[len(shared[0]) :]: v for k, v in state.items()}


def _targets(model: nn.Module, head: str) -> list[tuple[str, nn.Module]]:
    """The whole model first (it wins ties), then each child with parameters but the head."""
    children = [(n, c) for n, c in model.named_children() if n != head and any(True for _ in c.parameters())]
    return [("", model), *children]


def _is_classifier(key: str) -> bool:
    return any(part in CLASSIFIER_NAMES for part in key.split(".")[:-1])


def _summary(keys: list[str]) -> str:
    """A few names, or module groups with their tensor counts when there are many."""
    if len(keys) <= SHOWN:
        return ", ".join(keys)
    groups: dict[str, int] = {}
    for k in keys:
        group = ".".join(k.split(".")[:2]) if k.count(".") > 1 else k.split(".")[0]
        groups[group] = groups.get(group, 0) + 1
    shown = [f"{g}.* ({n})" for g, n in list(groups.items())[:SHOWN]]
    return ", ".join(shown) + (f", ... ({len(groups) - SHOWN} more groups)" if len(groups) > SHOWN else "")


def load_weights(
    model: nn.Module, source: str | Path, prefix: str = "", head: str = "head", fresh_head: bool = False
) -> LoadReport:
    """Load the weights file ``source`` into ``model`` (or the child they fit: its ``encoder``).

    ``prefix``: keep only the file's keys under it, stripped (``model.weights_prefix``). ``head``: the name
    of the model's child that may be missing from the file (its classifier or decoder; a timm classifier
    passes its own). ``fresh_head`` (classifiers): the file's head, where its shape is not the model's ``head``'s
    (1000 ImageNet classes, a run on other classes), is left out and the model's head starts fresh, as fine-tuning
    on new classes wants; where the keys went into a child (a plain timm file into a ``TimmClassifier``'s
    ``body``), the file's one classifier of the head's shape is loaded into the head. Raises ``UserError`` before
    changing the model when more than the head differs.
    """
    path = Path(source).expanduser()
    state = file_state = _strip(read_state_dict(path), prefix, path)
    scored = []
    for name, target in _targets(model, head):
        own = target.state_dict()
        scored.append((sum(k in own for k in state), -len(scored), name, target, own))
    hits, _, into, target, own = max(scored, key=lambda s: s[:2])
    where = "the model" if not into else f"its {into}"
    if hits == 0:
        raise UserError(
            f"weights file {path} does not fit {type(model).__name__}: none of its {len(state)} keys "
            f"({_summary(list(state)[:SHOWN])}) is a key of the model ({_summary(list(model.state_dict())[:3])}) "
            "or of its parts: is it the file for this model.name? (model.weights_prefix strips a prefix of its own)"
        )
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    may_miss = f"{head}." if not into else None
    bad_missing = [k for k in missing if may_miss is None or not k.startswith(may_miss)]
    bad_unexpected = [k for k in unexpected if not _is_classifier(k)]
    head_reshaped = [k for k in reshaped if may_miss is not None and k.startswith(may_miss)]
    whole_head = bool(head_reshaped) and not bad_missing and not bad_unexpected and len(head_reshaped) == len(reshaped)
    left_out: list[str] = []  # the file's head, of another shape: the model's head starts fresh (fresh_head)
    head_state: dict[str, Tensor] = {}  # the file's classifier of the head's shape, where the keys went into a child
    if fresh_head and whole_head:
        left_out = [k for k in state if k.startswith(f"{head}.")]
        state = {k: v for k, v in state.items() if k not in left_out}
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        reshaped = head_reshaped = []
    elif fresh_head and into:
        head_state, left_out = _file_head(
            model.get_submodule(head), [k for k in unexpected if _is_classifier(k)], state
        )
        unexpected = [k for k in unexpected if k not in left_out and k not in head_state]
    if head_reshaped and not bad_missing and not bad_unexpected and len(head_reshaped) == len(reshaped):
        k = head_reshaped[0]
        fix = "load its encoder alone with model.weights_prefix=encoder." if hasattr(model, "encoder") else ""
        raise UserError(
            f"weights file {path} has a head of another size ({k}: {list(state[k].shape)} in the file, "
            f"{list(own[k].shape)} in the model: trained for {state[k].shape[0]} classes, this data has "
            f"{own[k].shape[0]}): use a file trained on these classes{' or ' + fix if fix else ''}"
        )
    if bad_missing or bad_unexpected or reshaped:
        parts = []
        if bad_missing:
            parts.append(f"{len(bad_missing)} tensors missing ({_summary(bad_missing)})")
        if bad_unexpected:
            parts.append(f"{len(bad_unexpected)} unexpected ({_summary(bad_unexpected)})")
        if reshaped:
            k = reshaped[0]
            parts.append(
                f"{len(reshaped)} of another shape ({k}: {list(state[k].shape)} in the file, {list(own[k].shape)} "
                "in the model)"
            )
        raise UserError(
            f"weights file {path} does not fit {where} ({type(target).__name__}): {'; '.join(parts)}; only the "
            "head may differ: is it the file for this model.name?"
        )
    target.load_state_dict(state, strict=False)
    loaded = sum(k in own for k in state)
    if head_state:
        model.get_submodule(head).load_state_dict({k.rsplit(".", 1)[1]: v for k, v in head_state.items()})
        loaded += len(head_state)
    report = LoadReport(path, into, loaded, missing, unexpected, left_out)
    if dist.is_main():
        into_head = f" and {head} (the file's {_summary(list(head_state))})" if head_state else ""
        print(f"weights: {report.loaded} tensors from {path} into {where}{into_head}")
        print(f"weights: missing {len(missing)}{': ' + _summary(missing) if missing else ''} (initialised at random)")
        print(f"weights: unexpected {len(unexpected)}{': ' + _summary(unexpected) if unexpected else ''} (ignored)")
        if left_out:
            k = next((k for k in left_out if k.endswith(".weight")), left_out[0])
            size = model.get_submodule(head).weight.shape
            print(
                f"weights: the file's head is left out ({_summary(left_out)}; {k}: {list(file_state[k].shape)}): "
                f"the model's {head} ({list(size)}: {size[0]} classes) starts fresh"
            )
    return report


def _file_head(head: nn.Module, classifier: list[str], state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(the file's classifier that fits ``head``, keyed as in the file; the file's classifier keys left out).

    A plain timm file goes into a ``TimmClassifier``'s ``body``, its classifier (``head`` / ``fc`` /
    ``classifier``) beside it: one module of exactly the head's shapes is the head (a timm model trained on these
    classes); none (1000 ImageNet classes) or several (a distilled model's two heads) leave the head fresh."""
    own = {k: v.shape for k, v in head.state_dict().items()}
    modules: dict[str, dict[str, Any]] = {}
    for k in classifier:
        module, leaf = k.rsplit(".", 1)
        modules.setdefault(module, {})[leaf] = state[k].shape
    fits = [m for m, shapes in modules.items() if shapes == own]
    if len(fits) == 1:
        return {f"{fits[0]}.{leaf}": state[f"{fits[0]}.{leaf}"] for leaf in own}, []
    return {}, classifier


def hub_failure(what: str, error: BaseException) -> UserError:
    """One line for ImageNet weights a library could not fetch or read: where its cache is and the fix."""
    from huggingface_hub import constants

    offline = " (offline: HF_HUB_OFFLINE=1)" if constants.is_offline_mode() else ""
    said = _first_line(error)
    cause = type(error).__name__ + (f": {said}" if len(said) <= 100 else "")  # the hub's own advice is long
    return UserError(
        f"model.weights=imagenet: the ImageNet weights of {what} are not in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE}{offline} and could not be fetched ({cause}): "
        "fetch them once where the network is and copy that cache here (HF_HOME or HF_HUB_CACHE names it), "
        "or pass a local file: model.weights=/path/to/weights.pth"
    )
