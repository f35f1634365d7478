"""Segmentation data: one loader for the Hub, plain folders, the ADE20K and Pascal Context layouts and the synthetic
demo set, and a torch `Dataset` that decodes, checks and augments samples for training and evaluation.

Every source comes back in the schema of the Hub's `scene_parse_150`: a `datasets.DatasetDict` with splits
"train" and "validation", columns "image" (PIL, RGB) and "annotation" (PIL, mode "L", one class id per pixel),
plus `id2label` for the classes the model predicts.

Folder layout (`train_dir` / `validation_dir`), one folder per split:

    my_split/
      images/  a.jpg  b.png  sub/c.jpg ...     any PIL-readable image (.jpg .jpeg .png .bmp .tif .tiff .webp)
      masks/   a.png  b.png  sub/c.png ...     same relative path and stem, PNG, one class id per pixel
      id2label.json                            optional, {"0": "road", "1": "car", ...}

`annotations/` is accepted in place of `masks/`. Masks may be 8-bit grey ("L"), palette ("P": the palette
indices are the ids) or 16-bit with ids below 256; 255 is the ignore index. `id2label.json` is looked up in the
train folder, then in its parent; without it the classes are named `class_0`... and their number comes from
`num_labels`, or else from the largest id found in the training masks.

ADE20K (`ade20k_root`): the official `ADEChallengeData2016` folder (or its parent), with
`images/{training,validation}/*.jpg` and `annotations/{training,validation}/*.png`. Its id 0 is "other": the
150 classes are ids 1..150 and need `reduce_labels` (0 -> 255, others minus 1), as does `scene_parse_150`.

Pascal Context 59 (`pascal_context_root`): mmseg's layout, the `VOCdevkit/VOC2010` folder (or `VOCdevkit`, or its
parent), with `JPEGImages/<id>.jpg`, `SegmentationClassContext/<id>.png` and the split lists
`ImageSets/SegmentationContext/{train,val}.txt` (one id a line; "train" and "validation" here). Only the listed ids
are read. Its id 0 is background: the 59 classes are ids 1..59 and need `reduce_labels` too (mmseg's
`reduce_zero_label`).

A data set by name (`dataset_name`) is what `datasets.load_dataset` takes: a Hub id (one already in the cache loads
with `HF_HUB_OFFLINE=1`), or a local folder in the Hub's layout (`data/train-*.parquet`, `data/validation-*.parquet`,
...; e.g. a downloaded Hub repo), or a folder written by `save_to_disk` (read with `datasets.load_from_disk`). The
classes come from the ADE20K list for `scene_parse_150`, else from an `id2label.json` at the root of the repo or
folder (the Hub's convention), else they are inferred from the masks as for folders.

Annotations are returned as stored; `labels_need_reducing(...)` says whether to reduce them, and `id2label`
always describes the label space after that reduction (ADE20K: 150 classes, Pascal Context: 59).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..models.local_paths import check_local_folder
from .transforms import IGNORE_INDEX  # the one definition; re-exported for the scripts

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_FOLDERS = ("masks", "annotations")

# The 150 ADE20K / SceneParsing classes in id order after label reduction (the benchmark's objectInfo150 names).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# The 59 Pascal Context classes in id order after label reduction (mmseg's PascalContextDataset59).
PASCAL_CONTEXT_59_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door",
    "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain",
    "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)  # fmt: skip

# Hub data sets whose id 0 is "other" (the ADE20K convention).
_ADE20K_HUB_NAMES = ("scene_parse_150", "zhoubolei/scene_parse_150")

logger = logging.getLogger(__name__)


class SegmentationDataError(ValueError):
    """A sample that cannot be used: unreadable image, mask of another size, ids out of range. The message names
    the sample (split, index and, where known, the file), in one line.

    Raised in a DataLoader worker, torch raises it again in the main process as `SegmentationDataError("Caught
    SegmentationDataError in DataLoader worker process 0.\nOriginal Traceback ...")`: the message is then made the
    worker's one line again, so that a script can print it as the whole error; the worker's traceback is kept in
    `worker_traceback`.
    """

    def __init__(self, message: str = "", *args):
        last_line = f"{type(self).__module__}.{type(self).__qualname__}: "
        lines = message.rstrip().splitlines()
        self.worker_traceback = None
        if message.startswith(f"Caught {type(self).__name__} ") and lines[-1].startswith(last_line):
            self.worker_traceback, message = message, lines[-1][len(last_line) :]
        super().__init__(message, *args)


# --------------------------------------------------------------------------------------------------------------
# Labels


def reduce_labels(mask: np.ndarray | Image.Image | torch.Tensor) -> np.ndarray:
    """ADE20K's label reduction (mmseg's `reduce_zero_label`, Pascal Context's too): 0 ("other", background) -> 255
    (ignored), every other id minus one; 255 stays 255.

    Returns a new uint8 array (ids above 255 are an error: they cannot be ADE20K ids).
    """
    array = np.asarray(mask.numpy() if isinstance(mask, torch.Tensor) else mask)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"reduce_labels expects ids in [0, 255], got [{array.min()}, {array.max()}].")
    array = array.astype(np.uint8)
    reduced = array - np.uint8(1)  # 0 wraps to 255
    reduced[array == IGNORE_INDEX] = IGNORE_INDEX
    return reduced


def labels_need_reducing(
    dataset_name: str | None = None,
    ade20k_root: str | os.PathLike | None = None,
    pascal_context_root: str | os.PathLike | None = None,
) -> bool:
    """Whether a source stores ADE20K-style labels (0 = "other" or background, classes from 1) that `reduce_labels`
    must map: the ADE20K and Pascal Context layouts, and the Hub's ADE20K."""
    if ade20k_root is not None or pascal_context_root is not None:
        return True
    return dataset_name is not None and dataset_name.split("@")[0] in _ADE20K_HUB_NAMES


# --------------------------------------------------------------------------------------------------------------
# Sources


def load_segmentation_splits(
    dataset_name: str | None = None,
    train_dir: str | os.PathLike | None = None,
    validation_dir: str | os.PathLike | None = None,
    ade20k_root: str | os.PathLike | None = None,
    demo: bool = False,
    seed: int = 0,
    *,
    pascal_context_root: str | os.PathLike | None = None,
    num_labels: int | None = None,
    do_reduce_labels: bool | None = None,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    label_column: str = "annotation",
    validation_split: float = 0.15,
    cache_dir: str | None = None,
    demo_options: dict[str, Any] | None = None,
):
    """Load one source as `(DatasetDict with "train"/"validation", id2label)`; exactly one source must be given.

    Args:
        dataset_name: a data set with image + mask columns (`scene_parse_150` schema): a Hub id, a local folder
            in the Hub's layout or a `save_to_disk` folder (see this module's docstring). Without a validation
            split, `validation_split` of "train" is held out (seeded).
        train_dir / validation_dir: folders in the layout of this module's docstring. Without `validation_dir`,
            `validation_split` of the training folder is held out.
        ade20k_root: the official ADEChallengeData2016 folder or its parent.
        pascal_context_root: Pascal Context 59 in mmseg's layout: VOCdevkit/VOC2010, VOCdevkit or its parent.
        demo: the synthetic demo set (`offseg_hf.data.demo`); `demo_options` go to `make_demo_splits`.
        seed: seeds the demo set and any held-out split.
        num_labels: number of classes when neither the source nor an id2label.json names them.
        do_reduce_labels: whether the caller will apply `reduce_labels` (default: `labels_need_reducing`); only
            changes the class count inferred from the masks when nothing names the classes.
        image_column / label_column: Hub column names, renamed to "image" / "annotation".
    """
    chosen = [
        name
        for name, value in (
            ("dataset_name", dataset_name),
            ("train_dir", train_dir),
            ("ade20k_root", ade20k_root),
            ("pascal_context_root", pascal_context_root),
            ("demo", demo or None),
        )
        if value is not None
    ]
    if len(chosen) != 1:
        raise ValueError(
            "Give exactly one data source: dataset_name, train_dir (+ validation_dir), ade20k_root, "
            f"pascal_context_root or demo=True; got {chosen or 'none'}."
        )
    if validation_dir is not None and train_dir is None:
        raise ValueError("validation_dir needs train_dir.")

    if demo:
        from .demo import make_demo_splits

        return make_demo_splits(seed=seed, **(demo_options or {}))
    if ade20k_root is not None:
        return _load_ade20k(Path(ade20k_root))
    if pascal_context_root is not None:
        return _load_pascal_context(Path(pascal_context_root))
    if do_reduce_labels is None:
        do_reduce_labels = labels_need_reducing(dataset_name=dataset_name)
    if train_dir is not None:
        return _load_folders(Path(train_dir), validation_dir, num_labels, do_reduce_labels, validation_split, seed)
    columns = (image_column, label_column)
    return _load_named(
        dataset_name, dataset_config_name, columns, num_labels, do_reduce_labels, validation_split, seed, cache_dir
    )


def _image_features():
    import datasets

    return datasets.Features({"image": datasets.Image(mode="RGB"), "annotation": datasets.Image()})


def _files_dataset(pairs: list[tuple[str, Any]]):
    """A Dataset of (image path, mask path or {"bytes", "path"}) pairs, decoded lazily."""
    import datasets

    images = [path for path, _ in pairs]
    masks = [mask if isinstance(mask, dict) else {"path": mask, "bytes": None} for _, mask in pairs]
    return datasets.Dataset.from_dict({"image": images, "annotation": masks}, features=_image_features())


def _held_out(dataset, fraction: float, seed: int):
    import datasets

    if not 0 < fraction < 1:
        raise ValueError(f"validation_split must be in (0, 1), got {fraction}.")
    parts = dataset.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})


def _find_pairs(directory: Path) -> list[tuple[str, Any]]:
    """(image path, mask) for every image under directory/images, with its mask under masks/ or annotations/."""
    image_root = directory / "images"
    mask_root = next((directory / name for name in MASK_FOLDERS if (directory / name).is_dir()), None)
    if not image_root.is_dir() or mask_root is None:
        raise FileNotFoundError(
            f"{directory} must hold an images/ folder and a masks/ (or annotations/) folder with same-named PNG "
            "masks; see offseg_hf.data.datasets's docstring for the layout."
        )
    images = sorted(p for p in image_root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return _pair_files(
        ((path, mask_root / path.relative_to(image_root).with_suffix(".png")) for path in images),
        f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {image_root}.",
        mask_entry=_mask_entry,
    )


def _pair_files(
    candidates: Iterable[tuple[Path, Path]],
    none_message: str,
    mask_entry: Callable[[Path], Any] = str,
    listed_in: Path | None = None,
) -> list[tuple[str, Any]]:
    """(image path, mask entry) for each (image, mask) candidate. A missing image or mask is a FileNotFoundError
    naming it (and the split list that named it, `listed_in`); no candidate at all is one with `none_message`."""
    where = f" (listed in {listed_in})" if listed_in is not None else ""
    pairs = []
    for image_path, mask_path in candidates:
        if not image_path.is_file():
            raise FileNotFoundError(f"No image {image_path}{where}.")
        if not mask_path.is_file():
            raise FileNotFoundError(f"No mask for image {image_path}: expected {mask_path}{where}.")
        pairs.append((str(image_path), mask_entry(mask_path)))
    if not pairs:
        raise FileNotFoundError(none_message)
    return pairs


def _layout_root(root: Path, name: str, required: list[str], *inner: str) -> Path:
    """The folder of a data set's official layout (named by the last of `inner`): the first of `root`'s `inner`
    folders that exists, else `root` itself. It must hold every `required` folder, or a FileNotFoundError names
    the missing ones."""
    root = next((root / path for path in inner if (root / path).is_dir()), root)
    missing = [path for path in required if not (root / path).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{root} is not a {name} folder: expected {' and '.join(missing)} ({inner[-1]} layout)."
        )
    return root


def _split_datasets(pairs: dict[str, list[tuple[str, Any]]]):
    import datasets

    return datasets.DatasetDict({split: _files_dataset(split_pairs) for split, split_pairs in pairs.items()})


def _mask_entry(mask_path: Path) -> Any:
    """The mask's path if it is already 8-bit grey; palette and 16-bit masks are re-encoded as grey ids."""
    try:
        with Image.open(mask_path) as mask:
            mode = mask.mode
            if mode == "L":
                return str(mask_path)
            if mode not in ("P", "I", "I;16", "I;16B", "I;16L"):
                raise SegmentationDataError(
                    f"Mask {mask_path} has mode {mode!r}; masks must hold one class id per pixel (mode L, P or 16-bit)."
                )
            ids = np.asarray(mask)
    except OSError as error:
        raise SegmentationDataError(f"Cannot read mask {mask_path}: {error}") from error
    if ids.size and ids.max() > 255:
        raise SegmentationDataError(f"Mask {mask_path} has id {int(ids.max())}; ids must be below 256.")
    buffer = io.BytesIO()
    Image.fromarray(ids.astype(np.uint8), mode="L").save(buffer, format="PNG", compress_level=1)
    # Not the real path: `datasets` would then read the file again and drop these bytes. It still names the file.
    return {"bytes": buffer.getvalue(), "path": f"{mask_path} (as ids)"}


def _read_id2label(*candidates: Path) -> dict[int, str] | None:
    for path in candidates:
        if path.is_file():
            with open(path) as handle:
                return {int(key): str(value) for key, value in json.load(handle).items()}
    return None


def _max_label(dataset) -> int:
    """Largest id (ignoring 255) over a Dataset's masks: the fallback for the number of classes. Only the masks are
    decoded, through `SegmentationDataset` so that an unreadable one is named."""
    samples = SegmentationDataset(dataset, transform=None, num_labels=256, split="train")
    largest = 0
    for index in range(len(samples)):
        mask = samples._open(samples.raw[index]["annotation"], index, "mask")
        counts = np.bincount(np.asarray(mask).ravel(), minlength=256)
        counts[IGNORE_INDEX] = 0
        present = np.nonzero(counts)[0]
        if present.size:
            largest = max(largest, int(present.max()))
    return largest


def _inferred_id2label(splits, num_labels, do_reduce_labels, source) -> dict[int, str]:
    """Generic class names; their number from `num_labels`, else from the largest id in the training masks (ids
    1..N after reduction are N classes)."""
    if num_labels is None:
        largest = _max_label(splits["train"])
        num_labels = largest if do_reduce_labels else largest + 1
        logger.warning("%s names no classes: found ids up to %d, so %d classes.", source, largest, num_labels)
    return {index: f"class_{index}" for index in range(num_labels)}


def _load_folders(train_dir: Path, validation_dir, num_labels, do_reduce_labels, validation_split, seed):
    import datasets

    train = _files_dataset(_find_pairs(train_dir))
    if validation_dir is not None:
        splits = datasets.DatasetDict({"train": train, "validation": _files_dataset(_find_pairs(Path(validation_dir)))})
    else:
        splits = _held_out(train, validation_split, seed)
    id2label = _read_id2label(train_dir / "id2label.json", train_dir.parent / "id2label.json")
    if id2label is None:
        id2label = _inferred_id2label(splits, num_labels, do_reduce_labels, f"{train_dir} (no id2label.json)")
    return splits, id2label


def _load_ade20k(root: Path):
    folders = {"train": "training", "validation": "validation"}
    required = [f"{kind}/{folder}" for folder in folders.values() for kind in ("images", "annotations")]
    root = _layout_root(root, "ADE20K", required, "ADEChallengeData2016")
    pairs = {}
    for split, folder in folders.items():
        image_dir, mask_dir = root / "images" / folder, root / "annotations" / folder
        images = sorted(image_dir.glob("*.jpg"))
        candidates = ((path, mask_dir / f"{path.stem}.png") for path in images)
        pairs[split] = _pair_files(candidates, f"No .jpg images under {image_dir}.")
    return _split_datasets(pairs), dict(enumerate(ADE20K_CLASSES))


def _load_pascal_context(root: Path):
    lists = Path("ImageSets", "SegmentationContext")
    required = ["JPEGImages", "SegmentationClassContext", str(lists)]
    root = _layout_root(root, "Pascal Context", required, "VOC2010", "VOCdevkit/VOC2010")
    pairs = {}
    for split, name in (("train", "train"), ("validation", "val")):
        list_file = root / lists / f"{name}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"No split list {list_file} (Pascal Context: {lists}/{{train,val}}.txt).")
        ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        candidates = (
            (root / "JPEGImages" / f"{id_}.jpg", root / "SegmentationClassContext" / f"{id_}.png") for id_ in ids
        )
        pairs[split] = _pair_files(candidates, f"{list_file} lists no image.", listed_in=list_file)
    return _split_datasets(pairs), dict(enumerate(PASCAL_CONTEXT_59_CLASSES))


def _local_folder(dataset_name: str) -> Path | None:
    """The local folder `dataset_name` names, or None for a Hub id. As in `datasets.load_dataset`, an existing folder
    wins over a Hub id spelled the same. A name only a path can have (`./x`, `/x`, `a/b/c`, ...) that names no folder
    fails here: the Hub would only answer, later and less clearly, that it is not a repo id."""
    check_local_folder(dataset_name, "dataset_name")
    path = Path(os.path.expanduser(dataset_name))
    return path if path.is_dir() else None


def _saved_to_disk(folder: Path) -> bool:
    """Whether `save_to_disk` wrote the folder: `load_from_disk` reads it, `load_dataset` would not."""
    from datasets import config

    markers = (config.DATASETDICT_JSON_FILENAME, config.DATASET_STATE_JSON_FILENAME)
    return any((folder / name).is_file() for name in markers)


def _load_named(dataset_name, config_name, columns, num_labels, do_reduce_labels, validation_split, seed, cache_dir):
    """A data set by name: a Hub id, a local folder in the Hub's layout or a `save_to_disk` folder."""
    import datasets

    image_column, label_column = columns
    folder = _local_folder(dataset_name)
    if folder is not None and _saved_to_disk(folder):
        if config_name is not None:
            raise ValueError(f"{dataset_name} is a save_to_disk folder: it has no configuration {config_name!r}.")
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.Dataset):  # one split saved on its own
            loaded = datasets.DatasetDict({"train": loaded})
    else:
        loaded = datasets.load_dataset(str(folder or dataset_name), config_name, cache_dir=cache_dir)
    if "train" not in loaded:
        raise ValueError(f"{dataset_name} has no 'train' split (splits: {list(loaded)}).")
    for split in loaded.values():
        for column in (image_column, label_column):
            if column not in split.column_names:
                folder_hint = ""
                if folder is not None and (folder / "images").is_dir():
                    folder_hint = "; a folder of images/ and masks/ is read with train_dir (--train_dir)"
                raise ValueError(
                    f"{dataset_name} has no column {column!r} (columns: {split.column_names}); pass "
                    f"image_column / label_column (--image_column_name / --label_column_name){folder_hint}."
                )
    validation_name = next((name for name in ("validation", "val", "test") if name in loaded), None)

    def conform(split):
        split = split.select_columns([image_column, label_column])
        split = split.rename_columns({image_column: "image", label_column: "annotation"})
        return split.cast(_image_features())

    if validation_name is None:
        splits = _held_out(conform(loaded["train"]), validation_split, seed)
    else:
        splits = datasets.DatasetDict(
            {"train": conform(loaded["train"]), "validation": conform(loaded[validation_name])}
        )

    if labels_need_reducing(dataset_name=dataset_name):
        id2label = dict(enumerate(ADE20K_CLASSES))
    elif folder is not None:
        id2label = _read_id2label(folder / "id2label.json")  # where a Hub repo keeps it, so a download has it too
    else:
        id2label = _hub_id2label(dataset_name)
    if id2label is None:
        id2label = _inferred_id2label(splits, num_labels, do_reduce_labels, f"{dataset_name} (no id2label.json)")
    return splits, id2label


def _hub_id2label(dataset_name: str) -> dict[int, str] | None:
    """An id2label.json in the data set's Hub repository, the convention of the Hub's segmentation data sets. None
    when the repo has none, or when it cannot be fetched: offline (`HF_HUB_OFFLINE=1`, no network) a data set
    already in the cache still loads, so its classes are then inferred, with a warning, rather than the run failing."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        path = hf_hub_download(repo_id=dataset_name, filename="id2label.json", repo_type="dataset")
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base: the file may well exist on the Hub
        logger.warning(
            "%s: id2label.json is not in the local cache and the Hub cannot be reached (offline); the classes are "
            "inferred from the masks.",
            dataset_name,
        )
        return None
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None
    except HfHubHTTPError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.warning(
            "%s: cannot fetch id2label.json (%s); the classes are inferred from the masks.", dataset_name, reason
        )
        return None
    return _read_id2label(Path(path))


# --------------------------------------------------------------------------------------------------------------
# Decoding, checking and augmenting samples for torch


class SegmentationDataset(torch.utils.data.Dataset):
    """Decodes, checks and transforms the samples of one split for a `DataLoader`.

    A key is an index, or `(index, draw)` from `StreamSampler`: the transform's random generator is seeded by
    `(seed, draw)` (or `(seed, index)`), so augmentation depends on neither the worker nor the number of
    workers, and a resumed run draws exactly the augmentations of an uninterrupted one.

    A sample that cannot be used raises `SegmentationDataError` naming the split, the index and the file.

    Args:
        dataset: a `datasets.Dataset` with "image" and "annotation" columns.
        transform: `transform(image (3, H, W) uint8, labels (H, W) int64, rng) -> (pixel_values, labels)`.
        num_labels: ids must be in [0, num_labels) or the ignore index, after reduction.
        do_reduce_labels: apply `reduce_labels` first (ADE20K).
    """

    def __init__(
        self,
        dataset,
        transform: Callable,
        num_labels: int,
        do_reduce_labels: bool = False,
        seed: int = 0,
        split: str = "train",
        ignore_index: int = IGNORE_INDEX,
    ):
        import datasets

        # Read the stored bytes/paths ourselves: a decode error can then name the file, and grey or palette
        # masks are read as ids whatever the column's decoding options.
        self.raw = dataset.cast_column("image", datasets.Image(decode=False)).cast_column(
            "annotation", datasets.Image(decode=False)
        )
        self.transform = transform
        self.num_labels = num_labels
        self.do_reduce_labels = do_reduce_labels
        self.seed = seed
        self.split = split
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.raw)

    def describe(self, index: int) -> str:
        row = self.raw[index]
        names = [entry.get("path") for entry in (row["image"], row["annotation"]) if entry and entry.get("path")]
        return f"{self.split} sample {index}" + (f" ({', '.join(names)})" if names else "")

    def _open(self, entry: dict | None, index: int, what: str) -> Image.Image:
        if entry is None:
            raise SegmentationDataError(f"{self.describe(index)}: no {what}.")
        try:
            source = io.BytesIO(entry["bytes"]) if entry.get("bytes") else entry["path"]
            image = Image.open(source)
            image.load()
        except Exception as error:  # PIL raises many types for a broken file
            raise SegmentationDataError(f"{self.describe(index)}: cannot read the {what}: {error}") from error
        return image

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The checked sample before augmentation: image (3, H, W) uint8 RGB, labels (H, W) int64."""
        row = self.raw[index]
        image = self._open(row["image"], index, "image").convert("RGB")
        mask = self._open(row["annotation"], index, "mask")
        if mask.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise SegmentationDataError(
                f"{self.describe(index)}: the mask has mode {mask.mode!r}; it must hold one class id per pixel."
            )
        if mask.size != image.size:
            raise SegmentationDataError(
                f"{self.describe(index)}: the mask is {mask.size[0]}x{mask.size[1]} but the image is "
                f"{image.size[0]}x{image.size[1]} (width x height); they must match."
            )
        labels = np.asarray(mask).astype(np.int64)
        if self.do_reduce_labels:
            labels = reduce_labels(labels).astype(np.int64)
        self._check_ids(labels, index)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
        return pixels.contiguous(), torch.from_numpy(labels)

    def _check_ids(self, labels: np.ndarray, index: int) -> None:
        if labels.size == 0:
            return
        if labels.min() < 0 or labels.max() > 255:
            bad = [int(labels.min()), int(labels.max())]
        else:
            counts = np.bincount(labels.ravel(), minlength=256)
            counts[self.ignore_index] = 0
            bad = np.nonzero(counts[self.num_labels :])[0] + self.num_labels
            bad = bad.tolist()
        if bad:
            raise SegmentationDataError(
                f"{self.describe(index)}: label ids {bad[:10]} are neither in [0, {self.num_labels}) nor the ignore "
                f"index {self.ignore_index}" + (" (after reduce_labels)" if self.do_reduce_labels else "") + "."
            )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, draw = key if isinstance(key, tuple) else (key, key)
        image, labels = self.load(index)
        rng = np.random.default_rng([self.seed, draw])
        pixel_values, labels = self.transform(image, labels, rng)
        return {"pixel_values": pixel_values, "labels": labels}


def collate_segmentation(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples of equal size (training crops are padded to the crop size, so they are)."""
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}


class StreamSampler(torch.utils.data.Sampler):
    """An endless, resumable, sharded stream of `(index, draw)` keys: mmseg's infinite sampler for iteration-based
    training.

    The global stream is a fresh seeded permutation of the data set per pass, numbered by draw. Process `rank` of
    `world_size` takes draws rank, rank + world_size, ...; so one step's samples over all processes are the same
    as a single process would draw with the total batch, and `start` (draws already taken by this process)
    resumes the stream exactly.
    """

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        if length <= 0:
            raise ValueError("The training split is empty.")
        self.length, self.seed, self.rank, self.world_size, self.start = length, seed, rank, world_size, start

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        local = self.start
        epoch, order = -1, []
        while True:
            draw = local * self.world_size + self.rank  # position in the global stream
            if draw // self.length != epoch:
                epoch = draw // self.length
                order = self._permutation(epoch)
            yield order[draw % self.length], draw
            local += 1


def seed_worker(worker_id: int) -> None:
    """`worker_init_fn`: seed Python's and numpy's global generators in each DataLoader worker from the seed torch
    gives that worker (itself from the loader's `generator`), for any user transform that uses them. This module's
    transforms do not: they take a generator seeded per sample."""
    import random

    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


__all__ = [
    "ADE20K_CLASSES",
    "IGNORE_INDEX",
    "PASCAL_CONTEXT_59_CLASSES",
    "SegmentationDataError",
    "SegmentationDataset",
    "StreamSampler",
    "collate_segmentation",
    "labels_need_reducing",
    "load_segmentation_splits",
    "reduce_labels",
    "seed_worker",
]
