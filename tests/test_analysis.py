"""offseg_hf.analysis (the paper's Eq. 2 and Fig. 3) on cases with known answers, and examples/analyze_alignment.py."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation, OffsetLearning
from offseg_hf.analysis import (
    analyse_features,
    class_statistics,
    classifier_weights,
    cosine_similarity_matrix,
    default_classes,
    feature_offset_ratio,
    ideal_class_representations,
    masks_at_resolution,
    mean_off_diagonal,
    reconstruction_summary,
)

from .conftest import build_model, randomize_norms, tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "analyze_alignment.py"


def one_hot_rows(labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """M (P, N) written out by hand: row p is 1 where the label is classes[p]."""
    return torch.stack([(labels == k).to(torch.float64) for k in classes])


# ---------------------------------------------------------------------------------------------------------------
# Eq. 2


def test_eq2_reconstructs_masks_exactly_when_they_lie_in_the_feature_span():
    # E = [M^T R] Q: full column rank (N = 60 > C = 8), and M^T = E Q^-1[:, :P], so W* = (Q^-1[:, :P])^T exactly.
    generator = torch.Generator().manual_seed(0)
    height, width, channels, classes = 6, 10, 8, [0, 2, 5]
    labels = torch.tensor(classes)[torch.randint(0, 3, (height * width,), generator=generator)]
    labels[:3] = torch.tensor(classes)  # every class present
    masks = one_hot_rows(labels, classes)  # (P, N)
    extra = torch.randn(height * width, channels - len(classes), generator=generator, dtype=torch.float64)
    mixing = torch.randn(channels, channels, generator=generator, dtype=torch.float64) + 3 * torch.eye(
        channels, dtype=torch.float64
    )
    embeddings = torch.cat([masks.t(), extra], dim=1) @ mixing  # E: (N, C)
    assert torch.linalg.matrix_rank(embeddings) == channels

    result = analyse_features(embeddings.t().reshape(channels, height, width), labels.reshape(height, width))

    assert result.classes == classes
    expected = torch.linalg.solve(mixing, torch.eye(channels, dtype=torch.float64))[:, : len(classes)].t()
    torch.testing.assert_close(result.ideal, expected, rtol=0, atol=1e-8)
    assert (masks - result.ideal @ embeddings.t()).abs().max() < 1e-8  # M = W* E^T
    assert result.ious == [1.0, 1.0, 1.0] and result.miou == 1.0
    assert result.rank == channels and result.num_positions == height * width


def test_eq2_is_exact_with_fewer_positions_than_channels():
    # E^T (C x N) of full column rank: any mask, even a random one, is some W* E^T.
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(12, 20, generator=generator, dtype=torch.float64)  # N = 12 < C = 20
    labels = torch.randint(0, 4, (12,), generator=generator)
    classes = torch.unique(labels)
    ideal, rank = ideal_class_representations(embeddings, labels, classes)
    assert rank == 12
    assert (one_hot_rows(labels, classes.tolist()) - ideal @ embeddings.t()).abs().max() < 1e-8


def test_eq2_gives_the_minimum_norm_solution_for_rank_deficient_features():
    # Each class owns one basis direction (rank 2 of C = 4): the minimum-norm W* is the class's basis vector.
    labels = torch.tensor([0, 0, 1, 1, 1])
    embeddings = torch.zeros(5, 4, dtype=torch.float64)
    embeddings[labels == 0, 0] = 2.0
    embeddings[labels == 1, 2] = 0.5
    ideal, rank = ideal_class_representations(embeddings, labels, torch.tensor([0, 1]))
    assert rank == 2
    expected = torch.tensor([[0.5, 0, 0, 0], [0, 0, 2.0, 0]], dtype=torch.float64)
    torch.testing.assert_close(ideal, expected, rtol=0, atol=1e-12)


def test_rcond_drops_the_directions_of_small_singular_values():
    # Pixels [1, 0, 0] (class 0) and [1, 1e-3, 0] (class 1) differ only along a 1e-3 singular direction: the exact
    # W* separates them with weights of 1e3 along it; cut, both rows fall back to half of the shared direction.
    labels = torch.tensor([0, 1, 1])
    embeddings = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1e-3, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    exact, rank = ideal_class_representations(embeddings, labels, torch.tensor([0, 1]))
    assert rank == 3
    expected = torch.tensor([[1.0, -1e3, 0.0], [0.0, 1e3, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(exact, expected, atol=1e-7, rtol=1e-9)
    truncated, rank = ideal_class_representations(embeddings, labels, torch.tensor([0, 1]), rcond=1e-2)
    assert rank == 2
    expected = torch.tensor([[0.5, 2.5e-4, 0.0], [0.5, 2.5e-4, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(truncated, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Masks at the embedding resolution, ignore pixels


def test_masks_take_each_cells_majority_and_ignore_wins_only_as_majority():
    labels = torch.tensor(
        [
            [1, 1, 2, 2],
            [1, 3, 2, 255],
            [255, 255, 0, 0],
            [255, 4, 0, 7],
        ]
    )
    grid = masks_at_resolution(labels, (2, 2))
    assert grid.tolist() == [[1, 2], [255, 0]]


def test_ignore_pixels_are_left_out_of_eq2():
    # Classes 0..2 sit on basis vectors e_0..e_2, so W* = [I | 0]; the ignore pixels carry large embeddings that
    # would change W* were they fitted with any target.
    labels = torch.tensor([[0, 1, 2, 255], [0, 1, 2, 255], [255, 1, 2, 0]])
    features = torch.zeros(4, 3, 4, dtype=torch.float64)
    for k in range(3):
        features[k][labels == k] = 1.0
    features[:, labels == 255] = torch.tensor([5.0, -3.0, 7.0, 2.0], dtype=torch.float64).view(4, 1)

    result = analyse_features(features, labels)

    assert result.classes == [0, 1, 2] and result.num_positions == 9
    expected = torch.zeros(3, 4, dtype=torch.float64)
    expected[:, :3] = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(result.ideal, expected, rtol=0, atol=1e-12)
    assert result.counts == [3, 3, 3] and result.ious == [1.0, 1.0, 1.0]


def test_an_image_without_valid_pixels_has_no_classes():
    result = analyse_features(torch.randn(4, 2, 2), torch.full((2, 2), 255))
    assert result.classes == [] and result.num_positions == 0 and result.ideal.shape == (0, 4)


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def two_images_sharing_class_0():
    """Image A: classes 0 (on e_0) and 1 (on e_1); image B: classes 0 (on e_0) and 2 (on e_2). W*_0 = e_0 in both."""
    labels = torch.tensor([[0, 0, 1, 1]])
    first = torch.zeros(3, 1, 4)
    first[0, 0, :2], first[1, 0, 2:] = 1.0, 1.0
    second = torch.zeros(3, 1, 4)
    second[0, 0, :2], second[2, 0, 2:] = 1.0, 1.0
    return [analyse_features(first, labels, index=10), analyse_features(second, labels * 2, index=11)]


def test_identical_class_representations_have_similarity_one():
    results = two_images_sharing_class_0()
    fixed = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]], dtype=torch.float64)
    stats = class_statistics(results, 0, fixed)
    assert stats.images == [10, 11]
    torch.testing.assert_close(stats.similarity, torch.ones(2, 2, dtype=torch.float64))
    assert stats.mean_intra_class_similarity == pytest.approx(1.0)
    assert stats.similarity_to_fixed == pytest.approx([1.0, 1.0])
    assert stats.similarity_to_aligned is None  # no offset classifier
    # Class 1's W* (e_1) is orthogonal to the fixed row 1 (e_2); class 2 is only in image B.
    assert class_statistics(results, 1, fixed).similarity_to_fixed == pytest.approx([0.0])
    assert class_statistics(results, 2, fixed).images == [11]
    assert class_statistics(results, 0, fixed, max_images=1).images == [10]


def test_similarity_matrix_and_its_off_diagonal_mean():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    expected = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(cosine_similarity_matrix(vectors), expected)
    assert mean_off_diagonal(expected) == pytest.approx(-2 / 6)
    assert mean_off_diagonal(torch.ones(1, 1)) != mean_off_diagonal(torch.ones(1, 1))  # NaN: no pair


def test_reconstruction_summary_pools_intersections_and_unions_over_images():
    results = two_images_sharing_class_0()
    results[1].intersections, results[1].unions = [1, 2], [2, 2]  # class 0 half right in image B
    summary = reconstruction_summary(results, num_labels=3)
    # class 0: (2 + 1) / (2 + 2); classes 1 and 2: 1.
    assert summary["per_class_iou"] == {0: 0.75, 1: 1.0, 2: 1.0}
    assert summary["miou"] == pytest.approx((0.75 + 2) / 3)
    assert summary["mean_image_miou"] == pytest.approx((1.0 + 0.75) / 2)


def test_default_classes_are_those_in_the_most_images():
    results = two_images_sharing_class_0()  # class 0 in both images; 1 and 2 in one each, with 2 positions each
    results[1].counts = [2, 3]  # class 2 now owns more positions than class 1
    assert default_classes(results, 2) == [0, 2]
    assert default_classes(results, 5) == [0, 2, 1]


# ---------------------------------------------------------------------------------------------------------------
# Offset learning: W + dW and dE


def random_offset_module(class_offset=True, feature_offset=True) -> OffsetLearning:
    torch.manual_seed(0)
    module = OffsetLearning(5, 6, class_offset=class_offset, feature_offset=feature_offset).double()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.5)
    return module


@pytest.mark.parametrize("class_offset", [True, False])
@pytest.mark.parametrize("feature_offset", [True, False])
def test_aligned_class_embeddings_are_the_ones_forward_scores_with(class_offset, feature_offset):
    module = random_offset_module(class_offset, feature_offset)
    features = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    aligned = module.aligned_class_embeddings(features)  # (B, K, C)
    assert aligned.shape == (2, 5, 6)

    W = module.class_embeddings
    embeddings = features.flatten(2).transpose(1, 2)  # E: (B, HW, C)
    if feature_offset:  # dE = P_f(Softmax_K(E W^T) W), Eq. 9-11
        embeddings = embeddings + module.feature_offset_proj((embeddings @ W.t()).softmax(dim=-1) @ W)
    if not class_offset:
        torch.testing.assert_close(aligned, W.expand(2, -1, -1))
    scores = F.layer_norm(embeddings @ aligned.transpose(1, 2), (5,), module.mask_norm.weight, module.mask_norm.bias)
    torch.testing.assert_close(module(features), scores.transpose(1, 2).reshape(2, 5, 3, 4), rtol=1e-10, atol=1e-10)


def test_class_offset_changes_the_class_embeddings_per_image():
    module = random_offset_module()
    aligned = module.aligned_class_embeddings(torch.randn(2, 6, 3, 3, dtype=torch.float64))
    assert not torch.allclose(aligned[0], aligned[1]) and not torch.allclose(aligned[0], module.class_embeddings)


def test_feature_offset_ratio_on_a_case_with_a_known_answer():
    # Equal class rows v and P_f = I: every position's offset is v, so ||dE|| = sqrt(HW) ||v||.
    module = OffsetLearning(3, 2).double()
    with torch.no_grad():
        module.class_embeddings.copy_(torch.tensor([[3.0, 4.0]]).expand(3, 2))
        module.feature_offset_proj.weight.copy_(torch.eye(2))
    features = torch.ones(2, 2, 2, dtype=torch.float64)  # ||E|| = sqrt(8)
    assert feature_offset_ratio(module, features) == pytest.approx(5.0 * 2 / 8**0.5)
    assert feature_offset_ratio(OffsetLearning(3, 2, feature_offset=False), features.float()) is None


def test_classifier_weights_of_both_classifier_kinds():
    offset = build_model("segformer")
    weights, kind = classifier_weights(offset)
    assert kind == "offset" and torch.equal(weights, offset.classifier.class_embeddings.double())
    per_pixel = OffSegForSemanticSegmentation(tiny_config(classifier="per_pixel"))
    weights, kind = classifier_weights(per_pixel)
    assert kind == "per_pixel" and weights.shape == (6, 32)
    assert torch.equal(weights[4], per_pixel.classifier.classifier.weight[4, :, 0, 0].double())


# ---------------------------------------------------------------------------------------------------------------
# examples/analyze_alignment.py


def load_script():
    spec = importlib.util.spec_from_file_location("analyze_alignment_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEMO_NAMES = {0: "background", 1: "ellipse", 2: "rectangle", 3: "triangle", 4: "diamond"}


def save_model(kind: str, folder: Path) -> Path:
    names = {"id2label": DEMO_NAMES, "label2id": {v: k for k, v in DEMO_NAMES.items()}, "num_labels": 5}
    torch.manual_seed(0)
    if kind == "offseg-t":
        config = OffSegConfig.from_variant("offseg-t", **names)
    else:
        config = tiny_config(classifier=kind, **names)
    model = OffSegForSemanticSegmentation(config).eval()
    randomize_norms(model)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["offset", "per_pixel", "offseg-t"])
def test_script_writes_json_and_heatmaps(kind, tmp_path):
    model_dir = save_model(kind, tmp_path / "model")
    out = tmp_path / "out"
    # 64-pixel scenes, analysed at their size: 8x8 positions (MiT), so a shape owns a few cells.
    argv = ["--model_name_or_path", str(model_dir), "--demo", "--demo_image_size", "64", "--demo_num_validation", "4"]
    argv += ["--eval_scale", "128", "64", "--num_images", "4", "--num_classes", "2", "--output_dir", str(out)]
    load_script().main(argv)

    report = json.loads((out / "alignment.json").read_text())
    assert {"reconstruction", "classes", "summary", "images", "feature_offset_ratio", "classifier"} <= set(report)
    assert report["classifier"] == ("per_pixel" if kind == "per_pixel" else "offset")
    assert report["num_images"] == 4 and len(report["images"]) == 4
    assert report["classes"] and len(report["classes"]) == 2 and "background" in report["classes"]
    assert 0.0 <= report["reconstruction"]["miou"] <= 1.0
    for entry in report["classes"].values():
        count = entry["num_images"]
        assert 1 <= count <= 4 and len(entry["similarity"]) == count and len(entry["similarity_to_W"]) == count
        assert all(abs(entry["similarity"][i][i] - 1.0) < 1e-9 for i in range(count))
    if kind == "per_pixel":
        assert report["feature_offset_ratio"] is None and report["summary"]["mean_similarity_to_W_plus_dW"] is None
    else:
        assert report["feature_offset_ratio"]["mean"] > 0
        assert all(len(e["similarity_to_W_plus_dW"]) == e["num_images"] for e in report["classes"].values())

    with Image.open(out / "alignment.png") as png:
        assert png.size == (920, 420)  # two panels side by side, 460 x 420 pixels each
        colours = png.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # drawn, not blank


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_images", "0"], "--num_images must be at least 1"),
        (["--images_per_class", "1"], "at least 2"),
        (["--classes", "sky"], "unknown class name"),
        (["--classes", "ellipse", "ellipse"], "names a class twice"),
        (["--ade20k_root", "/nonexistent"], "exactly one data source"),
        (["--demo_image_size", "-3"], "--demo_image_size must be at least 1"),
        (["--rcond", "1.5"], "--rcond must be in [0, 1)"),
    ],
)
def test_script_rejects_bad_arguments_before_any_work(extra, message, tmp_path, capsys):
    model_dir = save_model("offset", tmp_path / "model")
    argv = ["--model_name_or_path", str(model_dir), "--demo", "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit):
        load_script().parse_args(argv)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_flag_has_help():
    for action in load_script().build_parser()._actions:
        assert action.help, action.option_strings
