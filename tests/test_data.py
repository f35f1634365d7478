"""Data sources (folders, ADE20K and Pascal Context layouts, demo), label reduction, sample checks and the resumable
sample stream."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from offseg_hf.data.datasets import (
    ADE20K_CLASSES,
    PASCAL_CONTEXT_59_CLASSES,
    SegmentationDataError,
    SegmentationDataset,
    StreamSampler,
    labels_need_reducing,
    load_segmentation_splits,
    reduce_labels,
)
from offseg_hf.data.demo import DEMO_CLASSES, make_demo_splits

from . import test_train_script
from .test_train_script import TINY_MODEL, TINY_RECIPE, TRAIN_SCRIPT, run, write_folder_split

train_script = test_train_script.train_script  # its fixture: examples/train.py as a module


def identity(image, labels, rng):
    return image, labels


def write_pair(image_dir, mask_dir, name, size=(12, 10), ids=(0, 1, 2), mask_mode="L", mask_size=None, seed=0):
    """An RGB JPEG/PNG image and its mask (same stem, .png) with the given ids in horizontal bands."""
    rng = np.random.default_rng(seed)
    width, height = size
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image_dir / name)
    mask_width, mask_height = mask_size or size
    labels = np.array(ids, dtype=np.uint8)[np.arange(mask_height) * len(ids) // mask_height][:, None]
    labels = np.repeat(labels, mask_width, axis=1)
    mask = Image.fromarray(labels, mode="L")
    if mask_mode == "P":
        mask = mask.convert("P")  # the palette indices are the ids
        mask.putpalette([value for index in range(256) for value in ((index * 37) % 256, index, 255 - index)])
    stem = name.rsplit(".", 1)[0]
    mask.save(mask_dir / f"{stem}.png")
    return labels


def test_reduce_labels_is_the_ade20k_rule():
    mask = np.array([[0, 1, 2], [150, 255, 7]], dtype=np.uint8)
    assert reduce_labels(mask).tolist() == [[255, 0, 1], [149, 255, 6]]
    assert reduce_labels(torch.tensor([0, 5])).tolist() == [255, 4]
    assert reduce_labels(Image.fromarray(mask)).dtype == np.uint8
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"
    assert labels_need_reducing(ade20k_root="x") and labels_need_reducing(dataset_name="scene_parse_150")
    assert not labels_need_reducing(dataset_name="someone/cityscapes")


def test_folder_layout_with_validation_dir_and_id2label(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for index in range(count):
            write_pair(tmp_path / split / "images", tmp_path / split / "masks", f"img{index}.jpg", seed=index)
    (tmp_path / "train" / "id2label.json").write_text(json.dumps({"0": "road", "1": "car", "2": "tree"}))
    splits, id2label = load_segmentation_splits(train_dir=tmp_path / "train", validation_dir=tmp_path / "val")
    assert id2label == {0: "road", 1: "car", 2: "tree"}
    assert (len(splits["train"]), len(splits["validation"])) == (3, 2)
    sample = splits["train"][0]
    assert sample["image"].mode == "RGB" and sample["annotation"].mode == "L"
    assert sample["image"].size == sample["annotation"].size == (12, 10)
    assert set(np.unique(np.asarray(sample["annotation"]))) == {0, 1, 2}


def test_folder_layout_palette_masks_annotations_folder_and_held_out_split(tmp_path):
    expected = {}
    for index in range(10):
        labels = write_pair(
            tmp_path / "images" / "sub",
            tmp_path / "annotations" / "sub",
            f"{index:02d}.png",
            ids=(0, 3, 5),
            mask_mode="P",
            seed=index,
        )
        expected[index] = labels
    splits, id2label = load_segmentation_splits(train_dir=tmp_path, validation_split=0.2, seed=1)
    assert (len(splits["train"]), len(splits["validation"])) == (8, 2)
    # No id2label.json: classes counted up to the largest id seen.
    assert id2label == {index: f"class_{index}" for index in range(6)}
    for split in splits.values():
        for sample in split:
            mask = sample["annotation"]
            assert mask.mode == "L"  # palette masks become grey ids, not palette colours
            assert set(np.unique(np.asarray(mask))) == {0, 3, 5}
    # The split is seeded.
    again, _ = load_segmentation_splits(train_dir=tmp_path, validation_split=0.2, seed=1, num_labels=6)
    assert [np.asarray(s["image"]).sum() for s in again["validation"]] == [
        np.asarray(s["image"]).sum() for s in splits["validation"]
    ]


def test_folder_layout_errors_name_the_file(tmp_path):
    write_pair(tmp_path / "images", tmp_path / "masks", "a.jpg")
    (tmp_path / "images" / "orphan.jpg").write_bytes((tmp_path / "images" / "a.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match="orphan.jpg"):
        load_segmentation_splits(train_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="images/ folder and a masks/"):
        load_segmentation_splits(train_dir=tmp_path / "masks")
    Image.new("RGB", (12, 10)).save(tmp_path / "masks" / "orphan.png")  # an RGB mask is ambiguous
    with pytest.raises(SegmentationDataError, match="orphan.png.*mode 'RGB'"):
        load_segmentation_splits(train_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one data source"):
        load_segmentation_splits(train_dir=tmp_path, demo=True)


def test_ade20k_layout(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for index in range(2):
            write_pair(
                root / "images" / split, root / "annotations" / split, f"ADE_{split}_{index}.jpg", ids=(0, 1, 150)
            )
    for path in (tmp_path, root):  # the folder itself or its parent
        splits, id2label = load_segmentation_splits(ade20k_root=path)
        assert len(id2label) == 150 and id2label[0] == "wall"
        assert (len(splits["train"]), len(splits["validation"])) == (2, 2)
    dataset = SegmentationDataset(splits["validation"], identity, num_labels=150, do_reduce_labels=True)
    _, labels = dataset.load(0)
    assert set(torch.unique(labels).tolist()) == {255, 0, 149}  # 0 -> ignore, 1 -> 0, 150 -> 149
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016 layout"):
        load_segmentation_splits(ade20k_root=tmp_path / "nothing")


def write_pascal_context(parent, ids=(0, 5, 59, 255)):
    """A tiny VOCdevkit/VOC2010 under `parent`: 20x16 images 2008_000000..4 (the last listed in no split), their
    masks with `ids` in bands, train.txt listing three and val.txt one."""
    root = parent / "VOCdevkit" / "VOC2010"
    names = [f"2008_{index:06d}" for index in range(5)]
    for index, name in enumerate(names):
        write_pair(root / "JPEGImages", root / "SegmentationClassContext", f"{name}.jpg", (20, 16), ids, seed=index)
    lists = root / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(names[:3]) + "\n")
    (lists / "val.txt").write_text(f"{names[3]}\n\n")  # a blank line is no id
    return root


def test_pascal_context_layout(tmp_path):
    root = write_pascal_context(tmp_path)
    assert len(PASCAL_CONTEXT_59_CLASSES) == 59 == len(set(PASCAL_CONTEXT_59_CLASSES))
    for path in (root, root.parent, tmp_path):  # VOC2010, VOCdevkit or its parent
        splits, id2label = load_segmentation_splits(pascal_context_root=path)
        assert id2label == dict(enumerate(PASCAL_CONTEXT_59_CLASSES))
        assert (id2label[0], id2label[58]) == ("aeroplane", "wood")
        assert (len(splits["train"]), len(splits["validation"])) == (3, 1)
    # Only the listed ids, in list order: 2008_000004 is in no split.
    undecoded = {name: split.cast_column("image", datasets.Image(decode=False)) for name, split in splits.items()}
    stems = {name: [Path(row["image"]["path"]).stem for row in split] for name, split in undecoded.items()}
    assert stems == {"train": ["2008_000000", "2008_000001", "2008_000002"], "validation": ["2008_000003"]}
    sample = splits["validation"][0]
    assert sample["image"].size == sample["annotation"].size == (20, 16)
    assert set(np.unique(np.asarray(sample["annotation"]))) == {0, 5, 59, 255}  # as stored
    assert labels_need_reducing(pascal_context_root=root)
    dataset = SegmentationDataset(splits["validation"], identity, num_labels=59, do_reduce_labels=True)
    _, labels = dataset.load(0)
    assert set(torch.unique(labels).tolist()) == {255, 4, 58}  # 0 (background) -> ignore, 5 -> 4, 59 -> 58, 255


def test_pascal_context_errors_name_the_missing_file(tmp_path):
    root = write_pascal_context(tmp_path)
    (root / "JPEGImages" / "2008_000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2008_000001\.jpg \(listed in .*train\.txt\)"):
        load_segmentation_splits(pascal_context_root=tmp_path)
    (root / "JPEGImages" / "2008_000004.jpg").rename(root / "JPEGImages" / "2008_000001.jpg")
    load_segmentation_splits(pascal_context_root=tmp_path)  # whole again
    (root / "SegmentationClassContext" / "2008_000003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"No mask for image .*2008_000003\.jpg: expected .*2008_000003\.png"):
        load_segmentation_splits(pascal_context_root=root)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"No split list .*SegmentationContext/val\.txt"):
        load_segmentation_splits(pascal_context_root=root)
    (root / "ImageSets" / "SegmentationContext" / "train.txt").write_text("\n")
    with pytest.raises(FileNotFoundError, match=r"train\.txt lists no image"):
        load_segmentation_splits(pascal_context_root=root)
    with pytest.raises(
        FileNotFoundError, match=r"not a Pascal Context folder: expected JPEGImages and .*VOC2010 layout"
    ):
        load_segmentation_splits(pascal_context_root=tmp_path / "nothing")
    with pytest.raises(ValueError, match="exactly one data source"):
        load_segmentation_splits(pascal_context_root=root, ade20k_root=root)


def test_demo_set_schema_and_determinism():
    splits, id2label = load_segmentation_splits(
        demo=True, seed=3, demo_options={"num_train": 6, "num_validation": 3, "image_size": 48}
    )
    assert id2label == dict(enumerate(DEMO_CLASSES))
    assert (len(splits["train"]), len(splits["validation"])) == (6, 3)
    sample = splits["train"][0]
    assert sample["image"].mode == "RGB" and sample["annotation"].mode == "L" and sample["image"].size == (48, 48)
    again, _ = make_demo_splits(seed=3, num_train=6, num_validation=3, image_size=48)
    other, _ = make_demo_splits(seed=4, num_train=6, num_validation=3, image_size=48)
    first = np.asarray(splits["train"][0]["image"])
    assert np.array_equal(first, np.asarray(again["train"][0]["image"]))
    assert not np.array_equal(first, np.asarray(other["train"][0]["image"]))
    # The held-out split shares no scene with training.
    train_images = {np.asarray(s["image"]).tobytes() for s in splits["train"]}
    assert not any(np.asarray(s["image"]).tobytes() in train_images for s in splits["validation"])
    # Every class occurs, with ids in range.
    ids = set()
    for split in splits.values():
        for s in split:
            ids |= set(np.unique(np.asarray(s["annotation"])).tolist())
    assert ids <= set(range(len(DEMO_CLASSES))) and len(ids) >= 4


def bad_folder(tmp_path):
    write_pair(tmp_path / "images", tmp_path / "masks", "good.jpg", ids=(0, 1))
    write_pair(tmp_path / "images", tmp_path / "masks", "small_mask.jpg", mask_size=(6, 5))
    write_pair(tmp_path / "images", tmp_path / "masks", "big_ids.jpg", ids=(0, 1, 7, 255))
    write_pair(tmp_path / "images", tmp_path / "masks", "zcorrupt.jpg")
    (tmp_path / "images" / "zcorrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    splits, _ = load_segmentation_splits(train_dir=tmp_path, validation_dir=tmp_path, num_labels=3)
    return SegmentationDataset(splits["train"], identity, num_labels=3, split="train")


def test_bad_samples_raise_errors_naming_them(tmp_path):
    dataset = bad_folder(tmp_path)
    names = [dataset.describe(index) for index in range(len(dataset))]
    order = {name.split("images/")[1].split(",")[0]: index for index, name in enumerate(names)}
    assert dataset[order["good.jpg"]]["labels"].shape == (10, 12)
    index = order["small_mask.jpg"]
    with pytest.raises(SegmentationDataError, match=rf"train sample {index} \(.*small_mask.jpg.*6x5.*12x10"):
        dataset[index]
    index = order["big_ids.jpg"]
    with pytest.raises(SegmentationDataError, match=rf"train sample {index} .*big_ids.*ids \[7\] .*\[0, 3\)"):
        dataset[index]
    index = order["zcorrupt.jpg"]
    with pytest.raises(SegmentationDataError, match=rf"train sample {index} .*zcorrupt.jpg.*cannot read the image"):
        dataset[index]


def test_bad_in_memory_sample_names_its_index():
    import datasets

    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    image = Image.new("RGB", (8, 8))
    mask = Image.fromarray(np.full((8, 8), 9, dtype=np.uint8))
    data = datasets.Dataset.from_dict(
        {"image": [image, image], "annotation": [Image.new("L", (8, 8)), mask]}, features=features
    )
    dataset = SegmentationDataset(data, identity, num_labels=5, split="validation")
    assert dataset[0]["labels"].sum() == 0
    with pytest.raises(SegmentationDataError, match=r"validation sample 1: label ids \[9\]"):
        dataset[1]


def test_augmentation_depends_on_the_draw_not_the_worker():
    splits, _ = make_demo_splits(num_train=4, num_validation=1, image_size=32)

    def noisy(image, labels, rng):
        return image.float() + float(rng.random()), labels

    dataset = SegmentationDataset(splits["train"], noisy, num_labels=len(DEMO_CLASSES), seed=5)
    assert torch.equal(dataset[(2, 9)]["pixel_values"], dataset[(2, 9)]["pixel_values"])
    assert not torch.equal(dataset[(2, 9)]["pixel_values"], dataset[(2, 13)]["pixel_values"])


def take(sampler, count):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_stream_sampler_shards_and_resumes():
    single = take(StreamSampler(10, seed=1), 40)
    assert [draw for _, draw in single] == list(range(40))
    for epoch in range(4):  # each pass is a permutation
        assert sorted(index for index, _ in single[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert [i for i, _ in single[:10]] != [i for i, _ in single[10:20]]
    # Two processes split the same stream: their union, draw by draw, is the single-process stream.
    rank0, rank1 = take(StreamSampler(10, 1, 0, 2), 20), take(StreamSampler(10, 1, 1, 2), 20)
    assert sorted(rank0 + rank1, key=lambda key: key[1]) == single
    # Resuming after 7 draws of this process continues exactly.
    assert take(StreamSampler(10, 1, 1, 2, start=7), 13) == rank1[7:]


def test_inferred_class_count_follows_label_reduction(tmp_path):
    for index in range(3):
        write_pair(tmp_path / "images", tmp_path / "masks", f"{index}.png", ids=(0, 1, 4), seed=index)
    _, plain = load_segmentation_splits(train_dir=tmp_path, validation_split=0.34)
    _, reduced = load_segmentation_splits(train_dir=tmp_path, validation_split=0.34, do_reduce_labels=True)
    assert (len(plain), len(reduced)) == (5, 4)  # ids 0..4, or 1..4 -> 0..3 after reduction


# ------------------------------------------------------------------------------------------------------------
# --dataset_name: what `datasets.load_dataset` takes (Hub id, a folder in the Hub's layout, a save_to_disk folder)

DEMO_SIZES = {"num_train": 6, "num_validation": 2, "image_size": 32}
NAMES = {"0": "sky", "1": "road", "2": "car", "3": "tree", "4": "wall"}


def write_hub_layout(root: Path, id2label: dict | None = None):
    """A data set as a Hub data set repo looks on disk once downloaded: data/{split}-00000-of-00001.parquet with
    "image" and "annotation" Image columns, and the repo's id2label.json if given. Returns the splits written."""
    splits, _ = make_demo_splits(seed=2, **DEMO_SIZES)
    for split, data in splits.items():
        data.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    if id2label is not None:
        (root / "id2label.json").write_text(json.dumps(id2label))
    return splits


def same_samples(loaded, written) -> bool:
    return len(loaded) == len(written) and all(
        np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        and np.array_equal(np.asarray(a["annotation"]), np.asarray(b["annotation"]))
        for a, b in zip(loaded, written, strict=True)
    )


def largest_id(splits) -> int:
    return max(int(np.asarray(sample["annotation"]).max()) for sample in splits["train"])


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Local data sets must never reach the Hub; `datasets` caches what it prepares under tmp_path."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the Hub was asked: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def test_dataset_name_reads_a_local_folder_in_the_hubs_layout(tmp_path, no_hub):
    written = write_hub_layout(tmp_path / "named", NAMES)
    splits, id2label = load_segmentation_splits(dataset_name=str(tmp_path / "named"))
    assert id2label == {int(key): name for key, name in NAMES.items()}  # the repo's own file
    assert same_samples(splits["train"], written["train"]) and same_samples(splits["validation"], written["validation"])
    sample = splits["validation"][0]
    assert sample["image"].mode == "RGB" and sample["annotation"].mode == "L" and sample["image"].size == (32, 32)

    # Without id2label.json the classes are counted from the masks, as for folders.
    write_hub_layout(tmp_path / "unnamed")
    splits, id2label = load_segmentation_splits(dataset_name=str(tmp_path / "unnamed"))
    assert id2label == {index: f"class_{index}" for index in range(largest_id(splits) + 1)}


def test_dataset_name_reads_a_save_to_disk_folder(tmp_path, no_hub):
    written, _ = make_demo_splits(seed=2, **DEMO_SIZES)
    written.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved" / "id2label.json").write_text(json.dumps(NAMES))
    splits, id2label = load_segmentation_splits(dataset_name=str(tmp_path / "saved"))
    assert id2label[4] == "wall" and same_samples(splits["train"], written["train"])
    with pytest.raises(ValueError, match="is a save_to_disk folder: it has no configuration 'full'"):
        load_segmentation_splits(dataset_name=str(tmp_path / "saved"), dataset_config_name="full")

    # One Dataset saved on its own is the training split: validation_split of it is held out.
    written["train"].save_to_disk(str(tmp_path / "one_split"))
    splits, id2label = load_segmentation_splits(dataset_name=str(tmp_path / "one_split"), validation_split=0.5)
    assert (len(splits["train"]), len(splits["validation"])) == (3, 3)
    assert len(id2label) == largest_id(splits) + 1


@pytest.mark.parametrize("name", ["./no_such_data", "{tmp}/no_such_data", "~/no/such/data", "a/b/c"])
def test_a_missing_local_dataset_name_fails_at_once_without_asking_the_hub(tmp_path, no_hub, monkeypatch, name):
    def refuse(*args, **kwargs):
        raise AssertionError("datasets was asked")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(FileNotFoundError, match=r"^dataset_name '.+': no such folder"):
        load_segmentation_splits(dataset_name=name.format(tmp=tmp_path))


def simulate_hub_cache(tmp_path, monkeypatch, repo_id: str) -> Path:
    """`repo_id` as `datasets` caches a Hub data set once loaded: prepared Arrow files under
    HF_DATASETS_CACHE/<owner>___<name>/default/0.0.0/<hash>, here prepared from the same parquet files a Hub repo
    holds. Offline, `datasets` finds it there. Returns the Hub file cache (HF_HUB_CACHE), empty."""
    owner, name = repo_id.split("/")
    cache = tmp_path / "datasets-cache"
    write_hub_layout(tmp_path / name)
    datasets.load_dataset(str(tmp_path / name), cache_dir=str(cache))  # prepares cache/<name>/default/0.0.0/<hash>
    (cache / name).rename(cache / f"{owner}___{name}")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path / "hub-cache"


def test_a_cached_hub_dataset_loads_offline_and_its_classes_come_from_the_cache_or_the_masks(
    tmp_path, monkeypatch, caplog
):
    hub_cache = simulate_hub_cache(tmp_path, monkeypatch, "someone/segs")
    (tmp_path / "segs").rename(tmp_path / "elsewhere")  # only the cache is left
    # id2label.json was never downloaded: the real hf_hub_download, offline, cannot fetch it. The run goes on.
    with caplog.at_level("WARNING", logger="offseg_hf.data.datasets"):
        splits, id2label = load_segmentation_splits(dataset_name="someone/segs")
    assert (len(splits["train"]), len(splits["validation"])) == (6, 2)
    assert id2label == {index: f"class_{index}" for index in range(largest_id(splits) + 1)}
    assert "someone/segs: id2label.json is not in the local cache and the Hub cannot be reached" in caplog.text

    # Once downloaded, hf_hub_download finds it in its cache (refs/main -> snapshots/<commit>/id2label.json).
    repo = hub_cache / "datasets--someone--segs"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "id2label.json").write_text(json.dumps(NAMES))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _, id2label = load_segmentation_splits(dataset_name="someone/segs")
    assert id2label == {int(key): name for key, name in NAMES.items()}


def test_the_hub_being_out_of_reach_for_id2label_is_a_warning(tmp_path, monkeypatch, caplog):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    written, _ = make_demo_splits(seed=2, **DEMO_SIZES)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *args, **kwargs: written)  # a cached data set

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError(
            "Cannot find the requested files in the disk cache and outgoing traffic has been disabled."
        )

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with caplog.at_level("WARNING", logger="offseg_hf.data.datasets"):
        _, id2label = load_segmentation_splits(dataset_name="someone/segs", num_labels=5)
    assert id2label == {index: f"class_{index}" for index in range(5)}
    assert "cannot be reached (offline)" in caplog.text

    def no_such_file(*args, **kwargs):
        raise EntryNotFoundError("404")

    caplog.clear()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_such_file)
    with caplog.at_level("WARNING", logger="offseg_hf.data.datasets"):
        _, id2label = load_segmentation_splits(dataset_name="someone/segs", num_labels=5)
    assert len(id2label) == 5 and "offline" not in caplog.text  # a repo without the file: nothing to warn about


def test_a_non_image_file_among_the_images_is_named_by_its_sample_even_from_a_worker(tmp_path):
    for index in range(3):
        write_pair(tmp_path / "images", tmp_path / "masks", f"{index}.jpg", seed=index)
    notes = tmp_path / "images" / "notes.jpg"
    notes.write_text("not an image, whatever its name says")
    write_pair(tmp_path / "spare", tmp_path / "masks", "notes.jpg")  # its mask is fine
    # No id2label.json: the classes are counted from the masks alone, without decoding the images.
    splits, id2label = load_segmentation_splits(train_dir=tmp_path, validation_dir=tmp_path)
    assert len(id2label) == 3
    dataset = SegmentationDataset(splits["train"], identity, num_labels=3, split="train")
    index = next(i for i in range(len(dataset)) if str(notes) in dataset.describe(i))
    with pytest.raises(SegmentationDataError) as in_process:
        dataset[index]
    message = str(in_process.value)
    assert message.startswith(f"train sample {index} ({notes}, ") and "cannot read the image" in message
    assert "\n" not in message
    # From a DataLoader worker torch raises it again with the worker's traceback: the message stays that line.
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=[index], num_workers=1)
    with pytest.raises(SegmentationDataError) as from_worker:
        next(iter(loader))
    assert str(from_worker.value) == message
    assert "Traceback" in from_worker.value.worker_traceback


# ------------------------------------------------------------------------------------------------------------
# The scripts: train.py end to end on each kind of --dataset_name, evaluate_segmentation.py on a local folder


def make_named_dataset(kind: str, tmp_path, monkeypatch) -> str:
    """The --dataset_name of a data set of `kind` (6 training and 2 validation 32x32 demo scenes)."""
    if kind == "hub_layout":
        write_hub_layout(tmp_path / "hub_layout", NAMES)
        return str(tmp_path / "hub_layout")
    if kind == "save_to_disk":
        make_demo_splits(seed=2, **DEMO_SIZES)[0].save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    simulate_hub_cache(tmp_path, monkeypatch, "someone/segs")
    return "someone/segs"


@pytest.mark.parametrize("kind", ["hub_layout", "save_to_disk", "cached_hub_id"])
def test_train_script_trains_and_evaluates_on_a_named_dataset(train_script, tmp_path, monkeypatch, kind):
    if kind != "cached_hub_id":
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    name = make_named_dataset(kind, tmp_path, monkeypatch)
    result = run(
        train_script, tmp_path / "out", "--recipe", "demo", "--max_train_steps", "2", data=["--dataset_name", name]
    )
    assert result["step"] == 2 and result["metrics"]["num_images"] == 2
    assert result["metrics"]["num_pixels"] == 2 * 32 * 32  # both validation scenes, every pixel labelled
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["id2label"]
    if kind == "hub_layout":
        assert saved == NAMES
    else:
        assert set(saved.values()) <= {f"class_{index}" for index in range(5)} and len(saved) >= 2
    if kind == "hub_layout":
        evaluate = load_script("evaluate_segmentation.py")
        card = tmp_path / "README.md"
        argv = ["--model_name_or_path", str(tmp_path / "out"), "--dataset_name", name, "--recipe", "demo"]
        argv += ["--eval_scale", "128", "32"]  # TINY_RECIPE's, so the figures are training's
        evaluated = evaluate.main([*argv, "--device", "cpu", "--model_card", str(card)])
        assert evaluated["num_images"] == 2 and evaluated["class_names"] == list(NAMES.values())
        assert evaluated["mean_iou"] == pytest.approx(result["metrics"]["mean_iou"])
        from huggingface_hub import ModelCard

        assert ModelCard.load(card).data.eval_results[0].dataset_type == "hub_layout"  # the folder, not its path


def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"data_test_{name[:-3]}", TRAIN_SCRIPT.parent / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scripts_refuse_a_missing_dataset_folder_in_one_line(train_script, tmp_path, capsys):
    missing = str(tmp_path / "no_such_data")
    analysis = ["--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "analysis")]
    for parse, extra in (
        (train_script.parse_args, []),
        (load_script("evaluate_segmentation.py").parse_args, ["--model_name_or_path", "unused"]),
        (load_script("analyze_alignment.py").parse_args, analysis),
    ):
        with pytest.raises(SystemExit) as caught:
            parse(["--dataset_name", missing, *extra])
        assert caught.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].endswith(f"error: --dataset_name '{missing}': no such folder.")


@pytest.mark.slow
def test_train_script_stops_on_a_non_image_file_with_one_line(tmp_path):
    """The command line, in a fresh process: one line on stderr naming the file, exit status 1, no traceback. One
    DataLoader worker, as real recipes use them."""
    folder = tmp_path / "train"
    write_folder_split(folder, 5, seed=1)
    (folder / "images" / "notes.jpg").write_text("not an image, whatever its name says")
    (folder / "masks" / "notes.png").write_bytes((folder / "masks" / "scene0.png").read_bytes())  # a fine mask
    # 6 images, 1 held out: 2 steps of 4 draw every training image, and the final evaluation reads the held-out one.
    command = [sys.executable, str(TRAIN_SCRIPT), "--train_dir", str(folder), "--recipe", "demo", *TINY_RECIPE]
    command += [*TINY_MODEL, "--max_train_steps", "2", "--dataloader_num_workers", "1", "--output_dir", "out"]
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    # The training loop's progress bar, left open, may share the line: the error is what follows "error: ".
    errors = [line[line.index("error: ") :] for line in completed.stderr.splitlines() if "error: " in line]
    notes = folder / "images" / "notes.jpg"
    pattern = rf"error: (train|validation) sample \d+ \({notes}, .*notes\.png\): cannot read the image: .*"
    assert len(errors) == 1 and re.fullmatch(pattern, errors[0]), completed.stderr[-3000:]
