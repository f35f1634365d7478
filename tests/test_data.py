"""Data sources (folders, ADE20K and Pascal Context layouts, demo), label reduction, sample checks and the resumable
sample stream."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from offseg_hf.data import (
    ADE20K_CLASSES,
    PASCAL_CONTEXT_59_CLASSES,
    SegmentationDataError,
    SegmentationDataset,
    StreamSampler,
    labels_need_reducing,
    load_segmentation_splits,
    reduce_labels,
)
from offseg_hf.demo_data import DEMO_CLASSES, make_demo_splits


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
