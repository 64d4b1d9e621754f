"""Pictures: model outputs drawn on their image (:func:`draw_instances`, used by ``instseg-demo``)
and the loss curve of a training run (:func:`plot_loss_curve`, written by
:func:`instseg.engine.train` to ``OUTPUT_DIR/loss_curve.png``).

Drawing uses torchvision's ``draw_segmentation_masks`` / ``draw_bounding_boxes``
(``torchvision/utils.py``); the plot uses matplotlib's Agg canvas directly (no pyplot, so the
global backend of the calling program is left alone).
"""
from __future__ import annotations

import csv
import glob
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["PALETTE", "instance_colors", "draw_instances", "draw_internals", "internals_grid_shape", "read_loss_csv",
           "plot_loss_curve"]

#: Fixed RGB colours for instances without a dataset colour (``thing_colors``), by instance index
#: (cycled): 12 well separated hues.
PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)


def instance_colors(labels: Sequence[int], colors: Optional[Sequence[Sequence[int]]] = None) -> List[Tuple[int, int, int]]:
    """One RGB colour per instance: ``colors[label]`` (a dataset's ``thing_colors``, indexed by
    contiguous class id) when given and the label is in range, else :data:`PALETTE` by instance
    index (instance ``i`` gets ``PALETTE[i % 12]``)."""
    out = []
    for i, lab in enumerate(labels):
        if colors is not None and 0 <= int(lab) < len(colors):
            out.append(tuple(int(c) for c in colors[int(lab)])[:3])
        else:
            out.append(PALETTE[i % len(PALETTE)])
    return out


def _name(label: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names is not None and 0 <= int(label) < len(class_names):
        return str(class_names[int(label)])
    return str(int(label))


def _segments_of(output: Mapping) -> Tuple[Optional[object], List[int], List[float], bool]:
    """(bool masks (K, H, W) tensor, labels, scores, has_boxes) of an output dict: its instances,
    else its panoptic segments, else its semantic argmax classes."""
    import torch

    if "masks" in output:
        masks = torch.as_tensor(output["masks"]).bool()
        k = masks.shape[0]
        labels = [int(x) for x in torch.as_tensor(output.get("labels", torch.zeros(k, dtype=torch.int64))).tolist()]
        scores = [float(x) for x in torch.as_tensor(output.get("scores", torch.ones(k))).tolist()]
        return masks, labels, scores, True
    if "panoptic_seg" in output:
        pan = torch.as_tensor(output["panoptic_seg"])
        segs = list(output.get("segments_info", []))
        masks = torch.stack([pan == int(s["id"]) for s in segs]) if segs else torch.zeros((0,) + tuple(pan.shape), dtype=torch.bool)
        return masks, [int(s["category_id"]) for s in segs], [float(s.get("score", 1.0)) for s in segs], False
    if "sem_seg" in output:
        classes = torch.as_tensor(output["sem_seg"]).argmax(0)
        present = [int(c) for c in torch.unique(classes).tolist()]
        masks = torch.stack([classes == c for c in present]) if present else torch.zeros((0,) + tuple(classes.shape), dtype=torch.bool)
        return masks, present, [1.0] * len(present), False
    raise KeyError(f"output has none of 'masks', 'panoptic_seg', 'sem_seg' (keys: {sorted(output)})")


def dataset_classes_and_colors(dataset: str) -> Tuple[Optional[List[str]], Optional[List[Tuple[int, int, int]]]]:
    """``(class names, RGB colours)`` of a registered dataset for :func:`draw_instances`: its
    ``thing_classes`` (else ``stuff_classes``) and ``thing_colors`` from the MetadataCatalog,
    ``None`` where it has none. A metadata field that cannot be read (e.g. a lazy field whose
    json file is missing) is logged as a warning and gives ``None`` (class ids are drawn)."""
    import logging

    from instseg.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset)
    classes = colors = None
    try:
        for key in ("thing_classes", "stuff_classes"):
            if meta.has(key):
                classes = list(meta.get(key))
                break
        if meta.has("thing_colors"):
            colors = [tuple(int(c) for c in col) for col in meta.get("thing_colors")]
    except Exception as e:  # noqa: BLE001 - draw ids instead of failing a picture
        logging.getLogger(__name__).warning("No class names from dataset %r (%s: %s): drawing class ids",
                                            dataset, type(e).__name__, e)
    return classes, colors


def draw_instances(image: np.ndarray, output: Mapping, class_names: Optional[Sequence[str]] = None,
                   colors: Optional[Sequence[Sequence[int]]] = None, score_threshold: float = 0.5,
                   alpha: float = 0.5, box_width: int = 2, draw_boxes: bool = True) -> np.ndarray:
    """Draw a model output of the data contract (docs/architecture.md) on its image.

    Instances whose score is ``>= score_threshold`` are drawn: the mask blended with its colour
    (``uint8((1 - alpha) * pixel + alpha * colour)``, torchvision's ``draw_segmentation_masks``,
    one instance after the other by ascending score, so an overlap is blended twice), the
    box outlined in the same colour with the label ``"<class name> <score:.2f>"`` in its top-left
    corner (``draw_bounding_boxes``). An output without ``"masks"`` is drawn from its
    ``"panoptic_seg"`` segments (``segments_info``; thresholded on a segment's ``"score"`` when it
    has one), else from the argmax classes of ``"sem_seg"``: masks only, no boxes or labels.
    Pixels outside every drawn mask and box stay unchanged.

    Args:
        image: ``uint8 (H, W, 3)`` RGB, the image the output belongs to (the output's size).
        output: ``{"scores": (K,), "labels": int (K,), "masks": bool (K, H, W), "boxes": (K, 4)
            xyxy pixels}`` (tensors or arrays, any device); or a semantic / panoptic output.
        class_names: names by contiguous class id (a dataset's ``thing_classes``); ``None`` or an
            id out of range: the id is printed.
        colors: RGB colours by class id (``thing_colors``); ``None``: :data:`PALETTE` by instance index.
        score_threshold: the lowest score drawn.
        alpha: mask opacity in ``[0, 1]``.
        box_width: box outline width in pixels.
        draw_boxes: draw the boxes and labels (instance outputs).

    Returns:
        A new ``uint8 (H, W, 3)`` RGB array (``image`` is not modified).

    Raises:
        ValueError: ``image`` is not ``uint8 (H, W, 3)``; the masks' size differs from the image's
            (both sizes named).
        KeyError: ``output`` has no masks, panoptic or semantic prediction.
    """
    import torch
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be a uint8 (H, W, 3) RGB array, got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}")
    h, w = image.shape[:2]
    masks, labels, scores, has_boxes = _segments_of(output)
    masks = masks.cpu()
    if masks.shape[0] and tuple(masks.shape[-2:]) != (h, w):
        raise ValueError(f"the output's masks are {tuple(masks.shape[-2:])} (H, W) but the image is {(h, w)}: "
                         "draw on the image the output was predicted for (outputs are at the original size)")
    keep = [i for i, s in enumerate(scores) if s >= score_threshold]
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    if not keep:
        return image.copy()
    inst_colors = instance_colors([labels[i] for i in keep], colors)
    # one mask at a time, lowest score first: overlaps show the higher-scored instance blended
    # over the lower one (torchvision's single call blacks out every overlapping pixel)
    for j in sorted(range(len(keep)), key=lambda j: scores[keep[j]]):
        canvas = draw_segmentation_masks(canvas, masks[keep[j]][None], alpha=float(alpha), colors=[inst_colors[j]])
    if draw_boxes and has_boxes and "boxes" in output:
        boxes = torch.as_tensor(output["boxes"]).detach().float().cpu()[keep]
        # degenerate boxes (x2 < x1) of an untrained model would be rejected by torchvision
        x1, x2 = torch.minimum(boxes[:, 0], boxes[:, 2]), torch.maximum(boxes[:, 0], boxes[:, 2])
        y1, y2 = torch.minimum(boxes[:, 1], boxes[:, 3]), torch.maximum(boxes[:, 1], boxes[:, 3])
        boxes = torch.stack([x1.clamp(0, w - 1), y1.clamp(0, h - 1), x2.clamp(0, w - 1), y2.clamp(0, h - 1)], 1)
        texts = [f"{_name(labels[i], class_names)} {scores[i]:.2f}" for i in keep]
        canvas = draw_bounding_boxes(canvas, boxes, labels=texts, colors=inst_colors, width=int(box_width))
    return canvas.permute(1, 2, 0).contiguous().numpy()


# ---------------------------------------------------------------------------------------------
# internals (instseg-demo --show-internals)

#: Width of one tile of :func:`draw_internals`, pixels; its height is the image's aspect times
#: it plus :data:`TILE_TITLE_PX` for the title.
TILE_WIDTH_PX = 320
TILE_TITLE_PX = 28
_DPI = 100


def _panel_tiles(panel: Mapping) -> int:
    return int(panel["maps"].shape[0]) if panel["kind"] == "heatmaps" else 1


def internals_grid_shape(internals: Mapping, ncols: int = 4) -> Tuple[int, int, int]:
    """``(tiles, rows, columns)`` of the grid :func:`draw_internals` draws: one tile for the
    prediction overlay, one per map of a ``"heatmaps"`` panel, one per ``"points"`` / ``"boxes"``
    panel; ``min(ncols, tiles)`` columns.

    Raises:
        KeyError, ValueError: as :func:`instseg.modeling.internals.check_internals`; ``ncols < 1``.
    """
    from instseg.modeling.internals import check_internals

    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    tiles = 1 + sum(_panel_tiles(p) for p in check_internals(internals))
    cols = min(int(ncols), tiles)
    return tiles, int(math.ceil(tiles / cols)), cols


def draw_internals(image: np.ndarray, internals: Mapping, path: Union[str, os.PathLike],
                   class_names: Optional[Sequence[str]] = None, colors: Optional[Sequence[Sequence[int]]] = None,
                   score_threshold: float = 0.5, ncols: int = 4, alpha: float = 0.5) -> str:
    """Write one image's internals (:meth:`instseg.modeling.MetaArchBase.internals`, panels as in
    :mod:`instseg.modeling.internals`) as a PNG grid, row by row: first the prediction overlay
    (:func:`draw_instances` of ``internals["result"]``), then each panel's tiles, titled:

    * ``"heatmaps"``: one tile per map, the image with the map (``jet`` colour map, ``[0, 1]``,
      bilinear) blended at ``alpha`` over its ``extent``; title: the panel's title for the first
      tile, then the map's label (default ``"<class> <score>"`` of its result row);
    * ``"points"``: the image with the points (``viridis`` by ``values``); points of a result row
      are larger, outlined in the row's colour; points outside the image are not shown;
    * ``"boxes"``: the image with the boxes, a result row's box in its colour with
      ``"<class> <score>"``, the others thin grey.

    A row's colour is the one :func:`draw_instances` gives it. Each tile is
    :data:`TILE_WIDTH_PX` wide and ``TILE_WIDTH_PX * H / W + TILE_TITLE_PX`` high: the PNG is
    ``columns * TILE_WIDTH_PX`` x ``rows * tile height`` (:func:`internals_grid_shape`).
    Matplotlib's Agg canvas (no pyplot).

    Args:
        image: ``uint8 (H, W, 3)`` RGB, the image the internals belong to.
        internals: ``{"result": dict, "panels": list}`` of that image.
        path: the PNG to write (its folder is created).
        class_names, colors, score_threshold: as :func:`draw_instances`.
        ncols: tiles per row.
        alpha: heatmap opacity.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: ``image`` is not ``uint8 (H, W, 3)``, or a panel is malformed (named).
        KeyError: ``internals`` lacks ``"result"`` or ``"panels"``.
    """
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    overlay = draw_instances(image, internals["result"], class_names=class_names, colors=colors,
                             score_threshold=score_threshold)
    tiles, rows, cols = internals_grid_shape(internals, ncols)
    h, w = image.shape[:2]
    img_px = max(1, int(round(TILE_WIDTH_PX * h / w)))
    tile_h = img_px + TILE_TITLE_PX
    fig_w, fig_h = cols * TILE_WIDTH_PX, rows * tile_h
    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)

    res = internals["result"]
    scores = [float(x) for x in torch.as_tensor(res.get("scores", torch.zeros(0))).flatten().tolist()]
    labels = [int(x) for x in torch.as_tensor(res.get("labels", torch.zeros(len(scores), dtype=torch.int64))).flatten().tolist()]
    # the colours draw_instances uses: by position among the drawn rows; undrawn rows continue the palette
    drawn = [i for i, s in enumerate(scores) if s >= score_threshold]
    row_color = dict(zip(drawn, instance_colors([labels[i] for i in drawn], colors)))
    others = [i for i in range(len(scores)) if i not in row_color]
    for j, i in enumerate(others):
        known = colors is not None and 0 <= labels[i] < len(colors)
        row_color[i] = instance_colors([labels[i]], colors)[0] if known else PALETTE[(len(drawn) + j) % len(PALETTE)]

    def rgb01(c) -> Tuple[float, float, float]:
        return tuple(v / 255.0 for v in c)

    def row_text(r: int) -> str:
        return f"{_name(labels[r], class_names)} {scores[r]:.2f}" if 0 <= r < len(scores) else ""

    count = [0]

    def new_axes(title: str):
        k = count[0]
        count[0] += 1
        r, c = divmod(k, cols)
        left, bottom = c * TILE_WIDTH_PX / fig_w, 1.0 - (r * tile_h + TILE_TITLE_PX + img_px) / fig_h
        ax = fig.add_axes((left, bottom, TILE_WIDTH_PX / fig_w, img_px / fig_h))
        ax.imshow(image, extent=(0, w, h, 0), interpolation="bilinear")
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
        ax.set_title(title, fontsize=7, pad=3)
        return ax

    ax = new_axes(f"prediction (score >= {score_threshold:g})")
    ax.images[0].set_data(overlay)
    for panel in internals["panels"]:
        kind, title = panel["kind"], str(panel.get("title", panel["kind"]))
        inst = [int(x) for x in torch.as_tensor(panel["instances"]).tolist()]
        if kind == "heatmaps":
            maps = torch.as_tensor(panel["maps"]).float().numpy()
            ew, eh = panel["extent"]
            texts = panel.get("labels")
            for j in range(maps.shape[0]):
                sub = texts[j] if texts is not None else (row_text(inst[j]) or f"map {j}")
                ax = new_axes(f"{title}\n{sub}" if j == 0 else sub)
                ax.imshow(maps[j], extent=(0, ew, eh, 0), cmap="jet", vmin=0.0, vmax=1.0, alpha=float(alpha),
                          interpolation="bilinear")
                ax.set_xlim(0, w)
                ax.set_ylim(h, 0)
        elif kind == "points":
            ax = new_axes(title)
            pts = torch.as_tensor(panel["points"]).float().numpy()
            vals = panel.get("values")
            c = torch.as_tensor(vals).float().numpy() if vals is not None else np.full(len(pts), 0.5)
            plain = [k for k, r in enumerate(inst) if r < 0]
            ax.scatter(pts[plain, 0], pts[plain, 1], c=c[plain], cmap="viridis", vmin=0, vmax=1, s=9, linewidths=0)
            for k, r in enumerate(inst):
                if r >= 0:
                    ax.scatter(pts[k:k + 1, 0], pts[k:k + 1, 1], c=c[k:k + 1], cmap="viridis", vmin=0, vmax=1, s=40,
                               edgecolors=[rgb01(row_color.get(r, PALETTE[0]))], linewidths=1.5)
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
        elif kind == "boxes":
            from matplotlib.patches import Rectangle

            ax = new_axes(title)
            boxes = torch.as_tensor(panel["boxes"]).float().numpy()
            order = sorted(range(len(boxes)), key=lambda k: inst[k] >= 0)  # marked boxes on top
            for k in order:
                x1, y1, x2, y2 = (float(v) for v in boxes[k])
                r = inst[k]
                col = rgb01(row_color.get(r, PALETTE[0])) if r >= 0 else (0.75, 0.75, 0.75)
                ax.add_patch(Rectangle((min(x1, x2), min(y1, y2)), abs(x2 - x1), abs(y2 - y1), fill=False,
                                       edgecolor=col, linewidth=1.6 if r >= 0 else 0.6))
                if r >= 0:
                    ax.text(max(min(x1, x2), 0), max(min(y1, y2), 0), row_text(r), fontsize=6, color="white",
                            va="top", bbox=dict(facecolor=col, edgecolor="none", pad=1.0, alpha=0.8))
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


# ---------------------------------------------------------------------------------------------
# loss curve

_AUX = re.compile(r"_\d+$")              # auxiliary predictions: loss_cls_0, loss_dice_3, ...
_STAGE = re.compile(r"^stage(\d+)_")     # QueryInst's stages: stage0_loss_cls, ...


def _csv_files(source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[str]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isfile(path):
            return [path]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"loss CSV source not found: {path}")
        files = []
        for pattern in ("metrics.csv", os.path.join("version_*", "metrics.csv"),
                        os.path.join("csv", "version_*", "metrics.csv")):
            files += glob.glob(os.path.join(path, pattern))

        def version(p: str) -> Tuple[int, str]:
            m = re.search(r"version_(\d+)", p)
            return (int(m.group(1)) if m else -1, p)

        files = sorted(set(files), key=version)
        if not files:
            raise FileNotFoundError(f"no metrics.csv under {path} (looked for metrics.csv, version_*/metrics.csv, "
                                    "csv/version_*/metrics.csv)")
        return files
    files = [os.fspath(p) for p in source]
    for p in files:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"loss CSV file not found: {p}")
    if not files:
        raise FileNotFoundError("no loss CSV file given")
    return files


def read_loss_csv(source) -> Dict[str, Tuple[List[int], List[float]]]:
    """The training losses of Lightning ``CSVLogger`` files (``OUTPUT_DIR/csv/version_N/metrics.csv``:
    columns ``step``, ``train/total_loss``, ``train/<term>``, ...).

    Args:
        source: a ``metrics.csv`` file, a list of them (read in order), or a folder: ``OUTPUT_DIR``,
            ``OUTPUT_DIR/csv`` or one ``version_N`` (every ``version_*/metrics.csv``, by N: a
            resumed run's later file wins at the same step).

    Returns:
        ``{column without "train/": (steps, values)}`` for ``total_loss`` and every ``loss*``
        column, steps ascending, rows with an empty or non-finite value left out.

    Raises:
        FileNotFoundError: no such file / folder, or no ``metrics.csv`` in the folder (named).
        ValueError: no file has a ``step`` and a ``train/total_loss`` column (the file is named).
    """
    files = _csv_files(source)
    series: Dict[str, Dict[int, float]] = {}
    for path in files:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            if "step" not in cols or "train/total_loss" not in cols:
                continue
            names = [c for c in cols if c == "train/total_loss" or c.startswith("train/loss")
                     or (c.startswith("train/stage") and "_loss" in c)]
            for row in reader:
                try:
                    step = int(float(row["step"]))
                except (TypeError, ValueError):
                    continue
                for c in names:
                    try:
                        v = float(row.get(c) or "nan")
                    except ValueError:
                        continue
                    if math.isfinite(v):
                        series.setdefault(c[len("train/"):], {})[step] = v
    if "total_loss" not in series:
        raise ValueError(f"no training loss in {', '.join(files)}: a 'step' and a 'train/total_loss' column with "
                         "values are needed (Lightning CSVLogger of instseg.engine.train)")
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in series.items()}


def _main_terms(names: Sequence[str], max_terms: int) -> List[str]:
    """The terms to plot: no auxiliary ``_<i>`` copies, of QueryInst's stages only the last."""
    terms = [n for n in names if n != "total_loss" and not _AUX.search(n)]
    stages = [int(m.group(1)) for m in (_STAGE.match(n) for n in terms) if m]
    if stages:
        last = f"stage{max(stages)}_"
        terms = [n for n in terms if not _STAGE.match(n) or n.startswith(last)]
    return sorted(terms)[:max_terms]


def plot_loss_curve(csv_dir_or_files, out_png: Union[str, os.PathLike], max_terms: int = 8,
                    title: Optional[str] = None) -> str:
    """Plot the total loss and the main loss terms against the iteration, log y axis, as a PNG.

    The main terms are the ``loss*`` columns without the auxiliary copies (``loss_cls_0`` ..,
    FastInst's per-layer terms) and, for QueryInst, those of the last stage only (at most
    ``max_terms``, by name). Values ``<= 0`` cannot be shown on the log axis and are left out.

    Args:
        csv_dir_or_files: as ``source`` of :func:`read_loss_csv`.
        out_png: the PNG to write (its folder is created).
        max_terms: at most this many terms besides the total.
        title: the plot title (default: the CSV folder).

    Returns:
        ``out_png`` as a string.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_loss_csv`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = read_loss_csv(csv_dir_or_files)
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name in ["total_loss"] + _main_terms(list(series), max_terms):
        steps, values = series[name]
        pts = [(s, v) for s, v in zip(steps, values) if v > 0]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name,
                linewidth=2.0 if name == "total_loss" else 1.0, color="black" if name == "total_loss" else None)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (weighted)")
    src = csv_dir_or_files if isinstance(csv_dir_or_files, (str, os.PathLike)) else os.path.dirname(os.fspath(csv_dir_or_files[0]))
    ax.set_title(title if title is not None else f"training loss: {os.fspath(src)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
