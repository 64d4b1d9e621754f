"""The model-independent description of what a model does on an image ("internals"), returned by
:meth:`instseg.modeling.MetaArchBase.internals` and drawn by
:func:`instseg.utils.visualize.draw_internals` (``instseg-demo --show-internals``, docs/deploy.md).

One image's internals are ``{"result": <the usual output dict of the image>, "panels": [...]}``;
each panel is a dict with ``"kind"`` and ``"title"`` and one of three shapes:

* ``"heatmaps"``: ``"maps"`` float32 ``(K, h, w)`` in ``[0, 1]`` covering the image from its
  top-left corner to ``"extent"`` ``(width, height)`` in original pixels (a map at a stride of the
  padded input, cropped to the image: the extent is at least the image size);
  ``"instances"`` int64 ``(K,)``: the row of ``result`` each map belongs to (-1: none, e.g. an
  auxiliary query); ``"labels"``: optional tile titles (default: the row's class and score).
  One tile per map, the map overlaid on the image.
* ``"points"``: ``"points"`` float32 ``(P, 2)`` ``(x, y)`` in original pixels (may fall in the
  padding, outside the image), ``"values"`` optional float32 ``(P,)`` in ``[0, 1]`` (point
  colour), ``"instances"`` int64 ``(P,)`` (rows of ``result`` or -1). One tile.
* ``"boxes"``: ``"boxes"`` float32 ``(K, 4)`` xyxy in original pixels (not clipped),
  ``"instances"`` int64 ``(K,)`` (rows of ``result`` or -1). One tile.

The helpers below are what every model's ``internals`` needs: which instances to show
(:func:`select_kept`), maps and coordinates from the network input to the original image
(:func:`crop_maps_to_image`, :func:`input_to_original`), and the panel constructors, which check
shapes so that a renderer never sees a malformed panel.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "PANEL_KINDS",
    "boxes_panel",
    "check_internals",
    "crop_maps_to_image",
    "heatmaps_panel",
    "input_to_original",
    "normalize_maps",
    "points_panel",
    "select_kept",
]

#: The panel kinds a renderer knows.
PANEL_KINDS = ("heatmaps", "points", "boxes")


def select_kept(scores: torch.Tensor, score_threshold: float = 0.5, max_instances: int = 12,
                min_instances: int = 3) -> torch.Tensor:
    """The result rows whose internals are shown: those with ``score >= score_threshold`` (the
    ones the demo draws), highest first, at most ``max_instances``; when none passes, the
    ``min_instances`` highest (so that a picture always shows something).

    Args:
        scores: float ``(K,)`` scores of one image's result.

    Returns:
        int64 ``(k,)`` row indices, by descending score (``k = 0`` only when ``K = 0``).

    Raises:
        ValueError: ``max_instances < 1`` or ``min_instances < 1``.
    """
    if max_instances < 1 or min_instances < 1:
        raise ValueError(f"max_instances and min_instances must be >= 1, got {max_instances}, {min_instances}")
    scores = torch.as_tensor(scores).detach().float().flatten().cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    passing = order[scores[order] >= float(score_threshold)]
    return (passing[:max_instances] if passing.numel() else order[:min_instances]).to(torch.int64)


def crop_maps_to_image(maps: torch.Tensor, padded_size: Tuple[int, int], image_size: Tuple[int, int],
                       output_size: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[float, float]]:
    """Maps at a stride of the padded input, cropped to the cells that cover the image.

    Args:
        maps: ``(K, h, w)`` maps of the padded input ``padded_size`` ``(Hp, Wp)`` (stride
            ``Hp / h``, ``Wp / w``).
        image_size: ``(h_img, w_img)`` of the image inside the padding (after the test resize).
        output_size: ``(height, width)`` of the original image.

    Returns:
        ``(maps[:, :ceil(h_img * h / Hp), :ceil(w_img * w / Wp)], (width, height))``: the cropped
        maps and the original-image extent they cover (``>=`` the image size).
    """
    h, w = int(maps.shape[-2]), int(maps.shape[-1])
    hp, wp = int(padded_size[0]), int(padded_size[1])
    hi, wi = int(image_size[0]), int(image_size[1])
    rows, cols = min(h, math.ceil(hi * h / hp)), min(w, math.ceil(wi * w / wp))
    sy, sx = float(output_size[0]) / hi, float(output_size[1]) / wi
    return maps[..., :rows, :cols], (cols * wp / w * sx, rows * hp / h * sy)


def input_to_original(coords: torch.Tensor, image_size: Tuple[int, int], output_size: Tuple[int, int]) -> torch.Tensor:
    """``(..., 2)`` ``(x, y)`` points or ``(..., 4)`` xyxy boxes in pixels of the network input
    (after the test resize) -> the same in pixels of the original image (``output_size``
    ``(height, width)``), not clipped; float32."""
    sx = float(output_size[1]) / float(image_size[1])
    sy = float(output_size[0]) / float(image_size[0])
    n = coords.shape[-1]
    if n not in (2, 4):
        raise ValueError(f"expected (..., 2) points or (..., 4) boxes, got {tuple(coords.shape)}")
    return coords.float() * coords.new_tensor([sx, sy] * (n // 2), dtype=torch.float32)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """``(K, h, w)`` non-negative maps divided by their own maximum (``[0, 1]``; an all-zero map
    stays zero), e.g. attention weights that sum to 1 over the pixels."""
    peak = maps.flatten(1).amax(1).clamp(min=1e-12)
    return maps / peak[:, None, None]


def _rows(instances, k: int, what: str) -> torch.Tensor:
    if instances is None:
        return torch.full((k,), -1, dtype=torch.int64)
    rows = torch.as_tensor(instances, dtype=torch.int64).detach().cpu().flatten()
    if rows.numel() != k:
        raise ValueError(f"{what} panel: {rows.numel()} instance rows for {k} items")
    return rows


def heatmaps_panel(title: str, maps: torch.Tensor, extent: Tuple[float, float], instances=None,
                   labels: Optional[Sequence[str]] = None) -> Dict:
    """A ``"heatmaps"`` panel (module docstring): ``maps`` ``(K, h, w)`` clamped to ``[0, 1]``,
    float32 on the CPU.

    Raises:
        ValueError: ``maps`` is not 3-D, or ``instances`` / ``labels`` do not have ``K`` entries.
    """
    maps = torch.as_tensor(maps).detach().float().cpu()
    if maps.dim() != 3:
        raise ValueError(f"heatmaps panel '{title}': maps must be (K, h, w), got {tuple(maps.shape)}")
    k = maps.shape[0]
    if labels is not None and len(labels) != k:
        raise ValueError(f"heatmaps panel '{title}': {len(labels)} labels for {k} maps")
    return {"kind": "heatmaps", "title": str(title), "maps": maps.clamp(0, 1), "extent": (float(extent[0]), float(extent[1])),
            "instances": _rows(instances, k, f"heatmaps '{title}'"), "labels": None if labels is None else [str(s) for s in labels]}


def points_panel(title: str, points: torch.Tensor, values=None, instances=None) -> Dict:
    """A ``"points"`` panel (module docstring).

    Raises:
        ValueError: ``points`` is not ``(P, 2)``, or ``values`` / ``instances`` do not have ``P`` entries.
    """
    points = torch.as_tensor(points).detach().float().cpu()
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"points panel '{title}': points must be (P, 2), got {tuple(points.shape)}")
    p = points.shape[0]
    if values is not None:
        values = torch.as_tensor(values).detach().float().cpu().flatten()
        if values.numel() != p:
            raise ValueError(f"points panel '{title}': {values.numel()} values for {p} points")
        values = values.clamp(0, 1)
    return {"kind": "points", "title": str(title), "points": points, "values": values,
            "instances": _rows(instances, p, f"points '{title}'")}


def boxes_panel(title: str, boxes: torch.Tensor, instances=None) -> Dict:
    """A ``"boxes"`` panel (module docstring).

    Raises:
        ValueError: ``boxes`` is not ``(K, 4)``, or ``instances`` does not have ``K`` entries.
    """
    boxes = torch.as_tensor(boxes).detach().float().cpu()
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes panel '{title}': boxes must be (K, 4) xyxy, got {tuple(boxes.shape)}")
    return {"kind": "boxes", "title": str(title), "boxes": boxes, "instances": _rows(instances, boxes.shape[0], f"boxes '{title}'")}


def check_internals(internals: Dict) -> List[Dict]:
    """The panels of one image's internals, checked (``"result"`` and ``"panels"`` present, known kinds).

    Raises:
        KeyError: a key is missing. ValueError: an unknown panel kind (named).
    """
    for key in ("result", "panels"):
        if key not in internals:
            raise KeyError(f"internals need '{key}' (got keys {sorted(internals)})")
    for p in internals["panels"]:
        if p.get("kind") not in PANEL_KINDS:
            raise ValueError(f"unknown internals panel kind {p.get('kind')!r} (known: {PANEL_KINDS})")
    return list(internals["panels"])
