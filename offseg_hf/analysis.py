"""Ideal class representation mining (the paper's Sec. 3.2, Eq. 2 and Fig. 3) for OffSeg models.

For one image with pixel embeddings E (N, C) (the decoder output the classifier sees, one row per position) and
its ground-truth masks M (P, N) (one-hot, one row per class present in the image), the ideal class
representations are the W* (P, C) that reproduce the masks linearly:

    M = W* E^T    solved as    W* = M (E^T)^+           (2)

`+` is the Moore-Penrose pseudoinverse. W* is computed as the minimum-norm least-squares solution of
E X = M^T (`torch.linalg.lstsq` with the SVD driver, float64), so no inverse of the possibly singular E^T E is
formed; X = E^+ M^T and W* = X^T, which is exactly Eq. 2.

The masks are brought to the embedding grid by a majority vote per cell (the class covering most of the cell's
footprint in the full-resolution label map, the ignore label taking part in the vote): nearest resizing reads
one label pixel per cell, so a thin object and the cell's class depend on where that pixel falls, whereas the
embedding at that cell summarises its whole footprint. Cells whose majority is the ignore label are left out of
E and M. Only classes that own at least one cell are present.

`M_pred = W* E^T`, arg-maxed over the present classes, gives the reconstruction; its IoUs against the masks
measure how well a per-image linear classifier can separate the image's classes in the model's feature space.

The statistics compare W* across images (a fixed classifier can only fit all images if each class's W* points
the same way everywhere) and against what the model uses: the fixed classifier weights W of a per-pixel model,
the class embeddings W of an offset model and, per image, its aligned class representations W + dW (Eq. 8).

This module is not imported by the model code; it needs nothing beyond torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .data.transforms import IGNORE_INDEX
from .models.offset_learning import OffsetLearning, PerPixelClassifier


def masks_at_resolution(labels: torch.Tensor, size: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(H, W) class ids -> (h, w) class ids by a majority vote over each cell's footprint (ignore votes too)."""
    labels = labels.long()
    ids = torch.unique(labels)  # sorted, so ties go to the smaller id and the ignore label (255) loses them
    one_hot = (labels.unsqueeze(0) == ids.view(-1, 1, 1)).float()  # (U, H, W): only the ids present, not all K
    shares = F.adaptive_avg_pool2d(one_hot.unsqueeze(0), size)[0]  # (U, h, w): each id's share of each cell
    return ids[shares.argmax(dim=0)]


def ideal_class_representations(
    embeddings: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, rcond: float | None = None
) -> tuple[torch.Tensor, int]:
    """Eq. 2 for one image: W* (P, C) float64 and the rank of E (as used: singular values cut by `rcond`).

    Args:
        embeddings: E, (N, C), the valid positions only.
        labels: (N,) class id of each position.
        classes: (P,) the present class ids, in the order of W*'s rows.
        rcond: singular values of E below rcond * the largest count as zero (a truncated pseudoinverse); None
            keeps all that float64 resolves, which is Eq. 2 as written.
    """
    features = embeddings.detach().to(torch.float64).cpu()
    targets = (labels.cpu().view(-1, 1) == classes.cpu().view(1, -1)).to(torch.float64)  # M^T: (N, P)
    # The SVD driver gives the minimum-norm solution E^+ M^T also when E is rank deficient or N < C.
    solution = torch.linalg.lstsq(features, targets, rcond=rcond, driver="gelsd")
    return solution.solution.t().contiguous(), int(solution.rank)


def reconstruct(ideal: torch.Tensor, embeddings: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """M_pred = W* E^T, arg-maxed over the present classes: the (N,) reconstructed class ids."""
    scores = embeddings.detach().to(torch.float64).cpu() @ ideal.t()  # (N, P)
    return classes.cpu()[scores.argmax(dim=1)]


def intersections_and_unions(
    predicted: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor
) -> tuple[list[int], list[int]]:
    """Per class of `classes`: pixel counts of predicted AND true, and of predicted OR true."""
    intersections, unions = [], []
    for class_id in classes.tolist():
        is_predicted, is_true = predicted == class_id, labels == class_id
        intersections.append(int((is_predicted & is_true).sum()))
        unions.append(int((is_predicted | is_true).sum()))
    return intersections, unions


def cosine_similarity_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """(n, C) -> (n, n) pairwise cosine similarities (float64)."""
    unit = F.normalize(vectors.to(torch.float64), dim=1)
    return unit @ unit.t()


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of the entries off the diagonal; NaN for fewer than two rows (no pair to compare)."""
    count = matrix.shape[0]
    if count < 2:
        return math.nan
    return float((matrix.sum() - matrix.diagonal().sum()) / (count * (count - 1)))


def classifier_weights(model) -> tuple[torch.Tensor, str]:
    """The fixed class representations W (K, C) of a model, and its classifier kind ("offset" or "per_pixel")."""
    classifier = model.classifier
    if isinstance(classifier, OffsetLearning):
        return classifier.class_embeddings.detach().to(torch.float64).cpu(), "offset"
    if isinstance(classifier, PerPixelClassifier):
        weight = classifier.classifier.weight.detach()  # (K, C, 1, 1) 1x1 convolution
        return weight.flatten(1).to(torch.float64).cpu(), "per_pixel"
    raise TypeError(f"no class representations known for a {type(classifier).__name__} classifier.")


def feature_offset_ratio(module: OffsetLearning, features: torch.Tensor) -> float | None:
    """||dE|| / ||E|| (Frobenius) for one image's (C, h, w) features, dE = P_f(Softmax_K(W E^T)^T W) (Eq. 9-11);
    None without the feature-offset branch."""
    if module.feature_offset_proj is None:
        return None
    embeddings = features.flatten(1).t()  # E: (HW, C)
    position_attention = (embeddings @ module.class_embeddings.t()).softmax(dim=1)  # (HW, K), over classes
    offsets = module.feature_offset_proj(position_attention @ module.class_embeddings)  # dE: (HW, C)
    return float(offsets.detach().norm() / embeddings.detach().norm())


@dataclass
class ImageAlignment:
    """What `analyse_image` finds for one image; rows of `ideal` / `aligned` follow `classes`."""

    classes: list[int]
    ideal: torch.Tensor  # W*: (P, C) float64
    aligned: torch.Tensor | None  # W + dW of the present classes, offset models only: (P, C) float64
    intersections: list[int]
    unions: list[int]
    counts: list[int]  # ground-truth positions per class
    rank: int
    num_positions: int
    feature_offset_ratio: float | None = None
    index: int | None = None

    @property
    def ious(self) -> list[float]:
        return [i / u for i, u in zip(self.intersections, self.unions, strict=True)]

    @property
    def miou(self) -> float:
        return sum(self.ious) / len(self.ious) if self.ious else math.nan


def analyse_features(
    features: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    classifier: torch.nn.Module | None = None,
    index: int | None = None,
    rcond: float | None = None,
) -> ImageAlignment:
    """Eq. 2 and the reconstruction for one image's (C, h, w) embeddings and its (H, W) label map (any size).

    With an `OffsetLearning` classifier, also the image's W + dW and ||dE|| / ||E||.
    """
    channels, height, width = features.shape
    grid_labels = masks_at_resolution(labels.cpu(), (height, width), ignore_index).flatten()  # (N_all,)
    valid = grid_labels != ignore_index
    embeddings = features.detach().flatten(1).t().cpu()[valid]  # E: (N, C), ignore cells left out
    grid_labels = grid_labels[valid]
    classes = torch.unique(grid_labels)
    if classes.numel() == 0:
        empty = torch.zeros(0, channels, dtype=torch.float64)
        return ImageAlignment([], empty, None, [], [], [], 0, 0, index=index)
    ideal, rank = ideal_class_representations(embeddings, grid_labels, classes, rcond)
    intersections, unions = intersections_and_unions(reconstruct(ideal, embeddings, classes), grid_labels, classes)
    aligned, ratio = None, None
    if isinstance(classifier, OffsetLearning):
        with torch.no_grad():
            aligned_all = classifier.aligned_class_embeddings(features.unsqueeze(0))[0]  # (K, C), all positions
            ratio = feature_offset_ratio(classifier, features)
        aligned = aligned_all.detach().to(torch.float64).cpu()[classes]
    return ImageAlignment(
        classes=classes.tolist(),
        ideal=ideal,
        aligned=aligned,
        intersections=intersections,
        unions=unions,
        counts=[int((grid_labels == class_id).sum()) for class_id in classes.tolist()],
        rank=rank,
        num_positions=int(valid.sum()),
        feature_offset_ratio=ratio,
        index=index,
    )


@torch.no_grad()
def analyse_image(
    model,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    index: int | None = None,
    rcond: float | None = None,
) -> ImageAlignment:
    """Run `model` (an `OffSegForSemanticSegmentation` in eval mode) on one normalised (3, H', W') image and analyse
    the embeddings its classifier sees against the (H, W) label map."""
    device = next(model.parameters()).device
    features = model.offseg(pixel_values.unsqueeze(0).to(device)).last_hidden_state[0]  # (C, h, w)
    return analyse_features(features, labels, ignore_index, classifier=model.classifier, index=index, rcond=rcond)


def _mean(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.to(torch.float64), b.to(torch.float64), dim=0))


@dataclass
class ClassStatistics:
    """Fig. 3 for one class: its W* across the images that contain it, and how close W and W + dW are to it."""

    class_id: int
    images: list[int]
    similarity: torch.Tensor  # (n, n) cosine similarity of W* across the images
    similarity_to_fixed: list[float]  # per image: cos(W*, W)
    similarity_to_aligned: list[float] | None  # per image: cos(W*, W + dW), offset models only

    @property
    def mean_intra_class_similarity(self) -> float:
        return mean_off_diagonal(self.similarity)

    def to_dict(self) -> dict:
        aligned = self.similarity_to_aligned
        return {
            "class_id": self.class_id,
            "images": self.images,
            "num_images": len(self.images),
            "similarity": self.similarity.tolist(),
            "mean_intra_class_similarity": _none_if_nan(self.mean_intra_class_similarity),
            "similarity_to_W": self.similarity_to_fixed,
            "mean_similarity_to_W": _none_if_nan(_mean(self.similarity_to_fixed)),
            "similarity_to_W_plus_dW": aligned,
            "mean_similarity_to_W_plus_dW": None if aligned is None else _none_if_nan(_mean(aligned)),
        }


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def class_statistics(
    results: Sequence[ImageAlignment], class_id: int, fixed: torch.Tensor, max_images: int | None = None
) -> ClassStatistics:
    """Statistics of one class over the first `max_images` of `results` that contain it (all if None).

    `fixed` is the model's W (K, C); W + dW comes from the results (None when they carry none)."""
    images, ideal, to_fixed, to_aligned = [], [], [], []
    for position, result in enumerate(results):
        if class_id not in result.classes:
            continue
        if max_images is not None and len(images) == max_images:
            break
        row = result.classes.index(class_id)
        images.append(result.index if result.index is not None else position)
        ideal.append(result.ideal[row])
        to_fixed.append(_cosine(result.ideal[row], fixed[class_id]))
        if result.aligned is not None:
            to_aligned.append(_cosine(result.ideal[row], result.aligned[row]))
    channels = fixed.shape[1]
    stacked = torch.stack(ideal) if ideal else torch.zeros(0, channels, dtype=torch.float64)
    return ClassStatistics(
        class_id=class_id,
        images=images,
        similarity=cosine_similarity_matrix(stacked),
        similarity_to_fixed=to_fixed,
        similarity_to_aligned=to_aligned if to_aligned else None,
    )


def reconstruction_summary(results: Sequence[ImageAlignment], num_labels: int) -> dict:
    """mIoU of the reconstructions over the set (intersections and unions summed over images, then IoU per class,
    then the mean over the classes seen), and the mean of the per-image mIoUs."""
    intersections, unions = [0] * num_labels, [0] * num_labels
    for result in results:
        for class_id, i, u in zip(result.classes, result.intersections, result.unions, strict=True):
            intersections[class_id] += i
            unions[class_id] += u
    per_class = {k: intersections[k] / unions[k] for k in range(num_labels) if unions[k]}
    return {
        "miou": _none_if_nan(_mean(per_class.values())),
        "mean_image_miou": _none_if_nan(_mean(result.miou for result in results)),
        "per_class_iou": per_class,
    }


def default_classes(results: Sequence[ImageAlignment], count: int) -> list[int]:
    """The `count` classes present in the most images (ties: more positions, then the smaller id)."""
    images, positions = {}, {}
    for result in results:
        for class_id, positions_in_image in zip(result.classes, result.counts, strict=True):
            images[class_id] = images.get(class_id, 0) + 1
            positions[class_id] = positions.get(class_id, 0) + positions_in_image
    ranked = sorted(images, key=lambda k: (-images[k], -positions[k], k))
    return ranked[:count]


__all__ = [
    "IGNORE_INDEX",
    "ClassStatistics",
    "ImageAlignment",
    "analyse_features",
    "analyse_image",
    "class_statistics",
    "classifier_weights",
    "cosine_similarity_matrix",
    "default_classes",
    "feature_offset_ratio",
    "ideal_class_representations",
    "intersections_and_unions",
    "masks_at_resolution",
    "mean_off_diagonal",
    "reconstruct",
    "reconstruction_summary",
]
