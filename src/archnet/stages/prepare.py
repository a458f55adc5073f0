"""The prepare stage: a new run's inputs fixed on disk (teacher, data splits, blocks).

The data is cut into three disjoint splits: train (distillation), selection (scores, the
search and every other choice) and evaluation (reported figures only). The evaluation split
is the user's ``eval_data``, else the data set's own test split, else carved out of the data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from archnet.blocks import find_blocks
from archnet.config import ConvertConfig
from archnet.data import ImageData, check_finite, load_data, native_input_size, test_split
from archnet.errors import ArchnetError
from archnet.results import PrepareResult
from archnet.store import RunStore

MIN_IMAGES = 10

DataArg = ImageData | torch.Tensor | str


def resolve_input_size(config: ConvertConfig, model: nn.Module, data: DataArg) -> None:
    """Fill ``config.input_size`` when unset: from tensor data, the model's own configuration
    (timm's ``pretrained_cfg``), or the named data set's image size with as many channels as
    the model's first convolution reads; else fail and ask for it."""
    if config.input_size:
        return
    if isinstance(data, (ImageData, torch.Tensor)):
        images = data.images if isinstance(data, ImageData) else data
        config.input_size = tuple(images.shape[1:])
        return
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg["input_size"]) if "input_size" in cfg else native_input_size(data)
    if size is None:
        raise ArchnetError("cannot tell the model's input size; pass --input-size C,H,W")
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if "input_size" not in cfg and stem is not None:  # the data set's size, the model's channels
        size = (stem.in_channels, *size[1:])
    config.input_size = size


def as_image_data(data: DataArg, config: ConvertConfig, split: str = "train") -> ImageData:
    if isinstance(data, ImageData):
        check_finite(data.images, data.source or "data")
        return data
    if isinstance(data, torch.Tensor):
        check_finite(data, "tensor")
        return ImageData(images=data.float(), source="tensor")
    return _load(str(data), tuple(config.input_size), split)


def _load(spec: str, input_size: tuple[int, ...], split: str) -> ImageData:
    """``spec``'s data at the model's input size: images resized to (H, W) of a C,H,W size;
    tensor files taken at any size."""
    if len(input_size) == 3:
        c, h, w = input_size
        return load_data(spec, size=(h, w), channels=c, split=split, shape=input_size)
    if native_input_size(spec) is not None:
        raise ArchnetError(
            f"data set {spec} holds images, but the input size {input_size} is not C,H,W; pass "
            "--input-size C,H,W or your own inputs as an (N, ...) .pt/.npy tensor"
        )
    return load_data(spec, size=0, channels=0, split=split, shape=input_size)


@dataclass
class Splits:
    """The three disjoint splits as stored in data.pt, and where the evaluation one came from."""

    blob: dict[str, torch.Tensor]
    eval_source: str

    @property
    def sizes(self) -> dict[str, int]:
        return {k: len(self.blob[f"{k}_images"]) for k in ("train", "selection", "eval")}


def splits(data: DataArg, eval_data: DataArg | None, cfg: ConvertConfig) -> Splits:
    images = as_image_data(data, cfg)
    if len(images) < MIN_IMAGES:
        raise ArchnetError(
            f"data {images.source} has {len(images)} images; give at least {MIN_IMAGES}"
        )
    if tuple(images.images.shape[1:]) != tuple(cfg.input_size):
        raise ArchnetError(
            f"data {images.source} holds images of shape {tuple(images.images.shape[1:])} but "
            f"the input size is {tuple(cfg.input_size)}; pass matching --input-size or data"
        )
    evaluation, source = _evaluation(data, eval_data, cfg)
    train, selection, carved = _split(images, cfg, carve_eval=evaluation is None)
    if evaluation is None:
        evaluation, source = carved, f"carved out of the data ({cfg.eval_fraction:.0%})"
    blob = {
        "train_images": train.images.half(),
        "selection_images": selection.images.half(),
        "eval_images": evaluation.images.half(),
    }
    if evaluation.labels is not None:
        blob["eval_labels"] = evaluation.labels
    return Splits(blob, source)


def create(store: RunStore, teacher: nn.Module, data: DataArg, eval_data: DataArg | None) -> None:
    """Write config.toml, teacher.pt, data.pt and prepare.json of a new run."""
    cfg = store.config
    resolve_input_size(cfg, teacher, data)
    parts = splits(data, eval_data, cfg)
    teacher = teacher.eval().cpu()
    specs = find_blocks(teacher, tuple(cfg.input_size), cfg.blocks)
    if cfg.task == "auto":
        cfg.task = _task_from_outputs(teacher, parts.blob["train_images"][:16])
    torch.save(parts.blob, store.path("data.pt"))
    torch.save(teacher, store.path("teacher.pt"))
    store.save_config()
    result = PrepareResult(
        blocks=[s.to_dict() for s in specs],
        splits=parts.sizes,
        eval_source=parts.eval_source,
        labelled_eval="eval_labels" in parts.blob,
        input_size=list(cfg.input_size),
        fingerprint=fingerprint(teacher, parts.blob),
    )
    store.save("prepare.json", result)


@torch.no_grad()
def _task_from_outputs(teacher: nn.Module, images: torch.Tensor) -> str:
    """The task the teacher's outputs on a few training images imply (``task = "auto"``)."""
    from archnet.stages.common import console
    from archnet.tasks import output_kind

    name, why = output_kind(teacher(images.float()))
    console.print(f"[bold]task[/] {name}: {why} (name another with --task)")
    return name


def fingerprint_of(
    teacher: nn.Module, data: DataArg, eval_data: DataArg | None, cfg: ConvertConfig
) -> str:
    """The fingerprint a run created from these inputs with ``cfg`` would have."""
    return fingerprint(teacher.eval().cpu(), splits(data, eval_data, cfg).blob)


def _evaluation(
    data: DataArg, eval_data: DataArg | None, cfg: ConvertConfig
) -> tuple[ImageData | None, str]:
    """The evaluation split when it is not carved out of the data, and where it came from."""
    if eval_data is not None:
        ev = as_image_data(eval_data, cfg, split="test")
        return ev, f"given: {ev.source or 'eval_data'}"
    if isinstance(data, str) and len(cfg.input_size) == 3:
        c, h, w = cfg.input_size
        ev = test_split(data, size=(h, w), channels=c)
        if ev is not None:
            return ev, f"the test split of {data}"
    return None, ""


def _split(
    images: ImageData, cfg: ConvertConfig, carve_eval: bool
) -> tuple[ImageData, ImageData, ImageData | None]:
    """(train, selection, evaluation or None): disjoint, shuffled with the run's seed."""
    n = len(images)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_sel = max(1, round(n * cfg.selection_fraction))
    n_eval = max(1, round(n * cfg.eval_fraction)) if carve_eval else 0
    sel, ev, train = perm[:n_sel], perm[n_sel : n_sel + n_eval], perm[n_sel + n_eval :]
    if cfg.max_selection:
        sel = sel[: cfg.max_selection]
    if cfg.max_samples:
        train = train[: cfg.max_samples]
    carved = images.take(ev, "eval") if carve_eval else None
    return images.take(train, "train"), images.take(sel, "selection"), carved


def fingerprint(teacher: nn.Module, blob: dict[str, Any]) -> str:
    """A hash of the teacher's weights and the data splits: the identity of a run's inputs
    (under the teacher's own parameter names, before block discovery grouped any layers)."""
    from archnet.chains import ungrouped_state

    h = hashlib.sha1()
    for name, tensor in ungrouped_state(teacher).items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for key in sorted(blob):
        h.update(key.encode())
        h.update(blob[key].contiguous().numpy().tobytes())
    return h.hexdigest()
