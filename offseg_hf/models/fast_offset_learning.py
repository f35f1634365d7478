"""The fast form of offset learning (`offset_learning.py` holds the reference form; `forms.py` says how a module
chooses). The products are arranged so that the expensive ones stay at (HW x C x K) and none at (HW x C x C):

* E is read straight from the decoder's (B, C, H, W) map as a (B, C, HW) view; A is then `W @ E` with no
  permute or copy, and `Softmax_HW(A) E` is `A_cls @ E^T` with the transpose absorbed by the GEMM.
* The feature-offset term of the masks, dE (W')^T = Softmax_K(A)^T (W P_f^T) (W')^T, is evaluated right to
  left: the (K, K) matrix (W P_f^T)(W')^T is tiny, so the term costs HW*K*K instead of the 2*HW*C*C + HW*C*K
  of forming dE (K = 150 < C = 256 for ADE20K); the result equals the literal order up to float rounding.
* The scores come out as (B, HW, K) so the LayerNorm over K runs on the contiguous last dimension; the
  returned (B, K, H, W) logits are a channels_last view of that buffer (no copy).
* The GEMMs whose output has the classes on one side and the HW positions on the other run on the class rows
  padded to a multiple of 8 (`pad_class_rows`), except under `torch.export`.

For Mask2Former (`mask_offset_learning`) the feature-offset term is evaluated right to left through a small (Q, Q)
matrix, q' F'^T = q' F^T + (q' P_f q^T) Softmax_Q(A), so F' (HW x C) is never formed; masks wanted at a smaller
size (Mask2Former's attention masks) are computed there directly where the reduction is by even factors
(`even_reduction`): both mask terms are linear in F and in Softmax_Q(A), and a k-times bilinear reduction averages
2 of every k rows (columns), so Softmax_Q(A), which works per position, is only taken where it is read.

Each form's speed, per CPU, is in docs/speed.md.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .forms import exporting

# Class rows are padded to a multiple of this for the GEMMs whose output has the classes on one side and the HW
# positions on the other (see `pad_class_rows`).
CLASS_ROW_MULTIPLE = 8


def pad_class_rows(rows: torch.Tensor) -> torch.Tensor:
    """(..., K, C) -> (..., K8, C): zero rows appended up to a multiple of `CLASS_ROW_MULTIPLE`.

    Why: MKL's single-precision GEMM on a class count like ADE20K's 150 (not a multiple of its register tile) runs
    the (HW x C) x (C x K) products well below its speed at K = 152 (docs/speed.md has the figures, per CPU). The
    padded outputs are sliced off before anything reads them, so only the real rows' values leave; they equal the
    unpadded products up to float rounding. K is a config constant, so the padding is a fixed op in traced graphs.

    Exported graphs (`torch.export`, ONNX) are not padded: ONNX Runtime's GEMMs take K = 150 as it is, and the
    padding and the slices after it cost it more than they save.
    """
    if exporting():
        return rows
    padding = -rows.shape[-2] % CLASS_ROW_MULTIPLE
    return F.pad(rows, (0, 0, 0, padding)) if padding else rows


def offset_learning(
    module: nn.Module, features: torch.Tensor, output_class_attention: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`OffsetLearning.forward` in the fast form (module docstring): the same outputs up to float rounding."""
    height, width = features.shape[-2:]
    num_classes = module.num_classes
    embeddings = module._flatten(features)  # E^T: (B, C, HW), a view
    class_embeddings = module.class_embeddings  # W: (K, C)
    has_offsets = module.class_offset_proj is not None or module.feature_offset_proj is not None

    # The GEMMs with the classes on a long output side run on the class rows padded to K8, a multiple of 8 (zero
    # rows, sliced off again): see `pad_class_rows`.
    coupled_attention = class_attention = None
    if has_offsets or output_class_attention:
        coupled_attention = torch.matmul(pad_class_rows(class_embeddings), embeddings)[:, :num_classes]  # A
    if module.class_offset_proj is not None or output_class_attention:
        class_attention = coupled_attention.softmax(dim=-1)  # over positions: (B, K, HW)

    if not has_offsets:
        scores = torch.matmul(embeddings.transpose(1, 2), pad_class_rows(class_embeddings).t())  # (B, HW, K8)
    else:
        aligned_classes = module._aligned_classes(embeddings, class_attention)  # W': (B, K, C)
        padded_classes = pad_class_rows(aligned_classes).transpose(1, 2)  # (B, C, K8)
        scores = torch.matmul(embeddings.transpose(1, 2), padded_classes)  # E W'^T: (B, HW, K8)

        if module.feature_offset_proj is not None:
            position_attention = softmax_over_classes(coupled_attention)  # (B, HW, K)
            # dE W'^T = A_pos (W P_f^T) W'^T, with the small (K, K8) factor formed first.
            class_mixing = torch.matmul(module.feature_offset_proj(class_embeddings), padded_classes)  # (B, K, K8)
            # In place, so autocast casts no operand here: CUDA's runs the softmax in float32 and the products
            # in bf16. The product takes the scores' dtype, as autocast's out-of-place baddbmm would (a Python
            # branch on dtypes: no op in traced or exported graphs without autocast).
            if position_attention.dtype != scores.dtype:
                position_attention = position_attention.to(scores.dtype)
            scores = scores.baddbmm_(position_attention, class_mixing)  # (B, HW, K8), in place
    scores = scores[..., :num_classes]  # (B, HW, K)

    scores = module.mask_norm(scores)  # LayerNorm over the K class scores
    scores = scores.transpose(1, 2).unflatten(2, (height, width))  # (B, K, H, W), channels_last strides
    if output_class_attention:
        return scores, class_attention.unflatten(2, (height, width))
    return scores


def softmax_over_classes(coupled_attention: torch.Tensor) -> torch.Tensor:
    """Softmax_K(A)^T: (B, HW, K) from A (B, K, HW), normalised over the classes.

    Eager PyTorch normalises along the class dim of the (B, K, HW) tensor and the product reads the transposed view.
    In an exported graph that is a Softmax over a non-last axis, which ONNX Runtime runs by transposing in and out
    before the product's own transpose; there the scores are transposed once and normalised along the last axis.
    Same values."""
    if exporting():
        return coupled_attention.transpose(1, 2).softmax(dim=-1)
    return coupled_attention.softmax(dim=1).transpose(1, 2)


def mask_offset_learning(
    module: nn.Module,
    mask_embeddings: torch.Tensor,
    mask_features: torch.Tensor,
    size: tuple[int, int] | None = None,
    resized_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """`MaskOffsetLearning.forward` in the fast form (module docstring): the same masks up to float rounding."""
    height, width = mask_features.shape[-2:]
    if mask_features.shape[1] != module.channels or mask_embeddings.shape[-1] != module.channels:
        raise ValueError(
            f"MaskOffsetLearning expects {module.channels} channels, got mask embeddings "
            f"{tuple(mask_embeddings.shape)} and mask features {tuple(mask_features.shape)}."
        )
    features = mask_features.flatten(2)  # F^T: (B, C, HW), a view
    coupled_attention = torch.matmul(mask_embeddings, features)  # A: (B, Q, HW)
    class_context = torch.matmul(coupled_attention.softmax(dim=-1), features.transpose(1, 2))  # (B, Q, C)
    aligned_queries = mask_embeddings + module.class_offset_proj(class_context)  # q'
    # q' dF^T = q' P_f(Softmax_Q(A)^T q)^T = (q' W_f q^T) Softmax_Q(A), with the (Q, Q) factor formed first.
    query_mixing = torch.matmul(aligned_queries, module.feature_offset_proj(mask_embeddings).transpose(1, 2))
    steps = None if size is None else even_reduction((height, width), tuple(size))
    if steps is not None and steps != (1, 1):
        taps = _bilinear_taps(coupled_attention.unflatten(2, (height, width)), steps)  # n x (B, Q, h, w)
        position_attention = torch.stack(taps, dim=2).softmax(dim=1).mean(dim=2).flatten(2)
        if resized_features is None:
            resized_features = resize_features(mask_features, size)
        masks = torch.matmul(aligned_queries, resized_features.flatten(2))
        return torch.baddbmm(masks, query_mixing, position_attention).unflatten(2, tuple(size))
    masks = torch.matmul(aligned_queries, features)  # q' F^T: (B, Q, HW)
    masks = torch.baddbmm(masks, query_mixing, coupled_attention.softmax(dim=1)).unflatten(2, (height, width))
    if size is not None and tuple(size) != (height, width):
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    return masks


def resize_features(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask2Former's attention-mask resize (bilinear, `align_corners=False`) of a (B, C, H, W) map; at even
    reduction factors as the mean of the positions it reads (the same values, without the general resize kernel's
    index arithmetic)."""
    steps = even_reduction(tuple(features.shape[-2:]), tuple(size))
    if steps is None:
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)
    taps = _bilinear_taps(features, steps)
    return sum(taps[1:], taps[0]) * (1.0 / len(taps))


def even_reduction(source: tuple[int, int], target: tuple[int, int]) -> tuple[int, int] | None:
    """The per-dimension reduction factors from `source` to `target` when each is 1 or an even integer, else None
    (always None under `torch.export`: the test would tie the graph to the example's sizes)."""
    if exporting():
        return None
    steps = []
    for length, out in zip(source, target, strict=True):
        step = length // out if out else 0
        if step * out != length or (step != 1 and step % 2):
            return None
        steps.append(step)
    return tuple(steps)


def _bilinear_taps(tensor: torch.Tensor, steps: tuple[int, int]) -> list[torch.Tensor]:
    """The (B, n, h, w) strided views of a (B, n, H, W) map whose mean is its bilinear (`align_corners=False`)
    reduction by the factors `steps` (each 1 or even): output i of a k-times reduction samples k*i + (k-1)/2, the
    mean of k*i + k/2 - 1 and k*i + k/2."""
    row_step, col_step = steps
    rows = (0,) if row_step == 1 else (row_step // 2 - 1, row_step // 2)
    cols = (0,) if col_step == 1 else (col_step // 2 - 1, col_step // 2)
    return [tensor[:, :, r::row_step, c::col_step] for r in rows for c in cols]
