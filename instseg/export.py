"""ONNX export of a model's network and of the post-processing ONNX expresses (docs/deploy.md,
"Export (ONNX)").

What goes into the graph is the meta-architecture's ``export_forward(images, image_sizes)``
(:class:`instseg.modeling.MetaArchBase`; default ``flops_forward(images)``, the network alone)
with the pixel normalization in front of it. The graph's inputs are ``image``: one float32 RGB
image on the 0-255 scale, ``(1, 3, H, W)``, already resized and padded at the bottom / right to
a multiple of ``MODEL.SIZE_DIVISIBILITY`` (:func:`prepare_input` pads with the pixel mean, so
that the padding is 0 after normalization, exactly as
:func:`instseg.modeling.meta_arch.pad_to_divisible` pads the normalized batch), and, for the
models whose export uses it, ``image_size``: int64 ``(1, 2)``, the ``(h, w)`` of the image
inside the padding (boxes are clipped to it, proposals start from it). The graph returns the
tensors of ``export_forward`` under their own names (e.g. ``pred_logits``, ``pred_masks``, or
``scores``, ``labels``, ``boxes``, ``pred_masks``).

What stays in Python is the model's ``export_postprocess(outputs, batched_inputs, image_sizes,
padded_size)`` (default ``inference``), called by :func:`finish_postprocess`: the selection with
a data-dependent count (score threshold, top-k, optional NMS) and the work at the output
resolution (mask upsampling / pasting, cropping, resizing to the original size, binarization,
boxes). This module names no model.

Adaptive average poolings (``F.adaptive_avg_pool2d`` and ``nn.AdaptiveAvgPool2d``, e.g. a pyramid
pooling's 1 / 2 / 3 / 6 bins) are exported as slices and means with PyTorch's bins
(:func:`adaptive_avg_pool2d_as_slices`), because the TorchScript exporter refuses bins that do
not divide the input size; the bounds are computed from the traced shape, so they also follow a
dynamic height / width. ``nn.MultiheadAttention``'s inference fast path (an op ONNX does not have)
is switched off while tracing (the slow path computes the same function).

The export uses the TorchScript-based exporter of ``torch.onnx.export`` (``dynamo=False``), opset
17 by default; verification runs ONNX Runtime's ``CPUExecutionProvider``; ``simplify`` runs
onnxslim on the file. All three come with the ``export`` extra (``pip install .[export]``:
``onnx``, ``onnxruntime``, ``onnxslim``).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["OnnxNetwork", "OnnxRuntimeModel", "export_onnx", "verify_onnx", "finish_postprocess", "prepare_input",
           "run_onnx", "adaptive_avg_pool2d_as_slices", "INPUT_NAME", "SIZE_INPUT_NAME"]

#: Name of the graph's image input.
INPUT_NAME = "image"
#: Name of the graph's second input (int64 ``(1, 2)`` ``(h, w)``), present when the model's export uses it.
SIZE_INPUT_NAME = "image_size"


def _export_forward(model: nn.Module):
    fn = getattr(model, "export_forward", None)
    if callable(fn):
        return fn
    if callable(getattr(model, "flops_forward", None)):
        return lambda images, image_sizes: model.flops_forward(images)
    raise TypeError(f"{type(model).__name__} has no export_forward(images, image_sizes) or flops_forward(images): "
                    "it cannot be exported")


class OnnxNetwork(nn.Module):
    """The exported module: ``image`` float32 ``(B, 3, H, W)`` RGB 0-255 and ``image_size`` int64
    ``(B, 2)`` ``(h, w)`` -> the tensors of ``model.export_forward((image - pixel_mean) /
    pixel_std, image_size)`` in the order of ``output_names``.

    Args:
        model: a meta-architecture (:class:`instseg.modeling.MetaArchBase`) with
            ``export_forward`` (or, for other modules, ``flops_forward``).
        output_names: the keys of ``export_forward``'s dict to return; ``None``: every tensor it
            returns, in its order (found with a dry run on a zero image of ``probe_size``).
        probe_size: ``(H, W)`` of the dry run (a multiple of ``model.size_divisibility``).

    Raises:
        TypeError: the model has neither method, or it returns no dict of tensors.
    """

    def __init__(self, model: nn.Module, output_names: Optional[Sequence[str]] = None,
                 probe_size: Tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        self.model = model
        fn = _export_forward(model)
        if output_names is None:
            device = model.pixel_mean.device
            with torch.no_grad():
                out = fn(torch.zeros((1, 3, *probe_size), device=device),
                         torch.tensor([list(probe_size)], dtype=torch.int64, device=device))
            if not isinstance(out, dict):
                raise TypeError(f"{type(model).__name__}.export_forward returned {type(out).__name__}, not a dict")
            output_names = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
            if not output_names:
                raise TypeError(f"{type(model).__name__}.export_forward returned no tensor")
        self.output_names = list(output_names)

    def forward(self, image: torch.Tensor, image_size: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = (image - self.model.pixel_mean) / self.model.pixel_std
        out = _export_forward(self.model)(x, image_size)
        return tuple(out[k] for k in self.output_names)


def adaptive_avg_pool2d_as_slices(x: torch.Tensor, output_size) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` spelled out as slices and means: ``(..., h, w)`` -> ``(..., oh, ow)``.

    The TorchScript exporter refuses an adaptive pooling whose output size does not divide the
    input size (e.g. a pyramid pooling's 2 / 3 / 6 bins on an 8 x 11 map). The bins are PyTorch's
    (``start = floor(i * n / o)``, ``end = ceil((i + 1) * n / o)``), so the result is the same (up
    to the order of the sums, ~1e-7). The bounds are computed from ``x.shape`` without ``int()``
    (and without negative floor divisions, which ONNX's integer ``Div`` truncates), so that a
    traced graph keeps them as functions of a dynamic height / width.

    Args:
        x: ``(B, C, h, w)`` or ``(C, h, w)``.
        output_size: ``o`` or ``(oh, ow)``; a ``None`` entry keeps that input size.
    """
    h, w = x.shape[-2], x.shape[-1]
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if oh is None or ow is None:
        return adaptive_avg_pool2d_as_slices(x, (int(h) if oh is None else oh, int(w) if ow is None else ow))

    def bins(n, o):
        return [(i * n // o, ((i + 1) * n + o - 1) // o) for i in range(int(o))]

    rows = [torch.cat([x[..., a:b, c:d].mean(dim=(-2, -1), keepdim=True) for c, d in bins(w, ow)], dim=-1)
            for a, b in bins(h, oh)]
    return torch.cat(rows, dim=-2)


class _StaticAdaptiveAvgPool2d(nn.Module):
    """:func:`adaptive_avg_pool2d_as_slices` as a module (an ``nn.AdaptiveAvgPool2d`` stand-in)."""

    def __init__(self, output_size) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool2d_as_slices(x, self.output_size)


@contextlib.contextmanager
def _exportable_ops() -> Iterator[None]:
    """While tracing: ``torch.nn.functional.adaptive_avg_pool2d`` (which ``nn.AdaptiveAvgPool2d``
    calls too) is :func:`adaptive_avg_pool2d_as_slices`, and ``nn.MultiheadAttention``'s fast
    path (``aten::_native_multi_head_attention``, not in ONNX) is off. Both are restored after."""
    import torch.nn.functional as F

    original_pool = F.adaptive_avg_pool2d
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    F.adaptive_avg_pool2d = adaptive_avg_pool2d_as_slices
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        F.adaptive_avg_pool2d = original_pool
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


def _check_size(model: nn.Module, size: Tuple[int, int], what: str) -> Tuple[int, int]:
    h, w = (int(s) for s in size)
    d = max(int(getattr(model, "size_divisibility", 1)), 1)
    if h < 1 or w < 1 or h % d or w % d:
        raise ValueError(f"{what} {h}x{w} must be positive multiples of MODEL.SIZE_DIVISIBILITY ({d})")
    return h, w


def export_onnx(model: nn.Module, output_path: str, input_size: Tuple[int, int] = (640, 640),
                dynamic: bool = False, opset: int = 17, simplify: bool = False) -> List[str]:
    """Write the network of ``model`` with the in-graph part of its post-processing
    (:class:`OnnxNetwork`) to ``output_path``.

    Args:
        model: the meta-architecture (put in eval mode here; moved to nothing: export on the
            device it is on, the CPU for a portable file).
        output_path: the ``.onnx`` file to write.
        input_size: ``(H, W)`` pixels of the traced input, multiples of ``model.size_divisibility``;
            the size of the graph's input unless ``dynamic``.
        dynamic: height and width of the input (and so of the outputs) are dynamic axes (every
            model of the project: adaptive poolings become slices whose bounds follow the shape).
        opset: the ONNX opset (17 default).
        simplify: rewrite the file with ``onnxslim.slim(..., no_shape_infer=True)`` (constant
            folding, fusions, dead-node and redundant-op removal); same inputs and outputs.

    Returns:
        The output names, in the graph's order (the keys of ``export_forward``). The inputs are
        ``image`` and, when the model's export uses it, ``image_size`` (the exporter drops an
        unused input; :func:`run_onnx` feeds what the file declares).

    Raises:
        ValueError: ``input_size`` not a multiple of the size divisibility.
        ImportError: ``simplify`` without onnxslim (``pip install .[export]``).
        TypeError: see :class:`OnnxNetwork`.
    """
    h, w = _check_size(model, input_size, "input_size")
    if simplify:
        try:
            import onnxslim
        except ImportError as e:
            raise ImportError("simplify=True needs onnxslim: pip install .[export] (or pip install onnxslim)") from e
    model.eval()
    device = model.pixel_mean.device
    with _exportable_ops():
        net = OnnxNetwork(model, probe_size=(h, w)).eval()
    dummy = (torch.full((1, 3, h, w), 114.0, device=device), torch.tensor([[h, w]], dtype=torch.int64, device=device))
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {INPUT_NAME: {2: "height", 3: "width"}}
        for name in net.output_names:
            dynamic_axes[name] = {}  # sizes follow the input; let the exporter name them
    with torch.no_grad(), warnings.catch_warnings(), _exportable_ops():
        # tracing turns Python-side shapes into constants (fixed size: on purpose); said once in the docs
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(net, dummy, str(output_path), input_names=[INPUT_NAME, SIZE_INPUT_NAME],
                          output_names=net.output_names, opset_version=int(opset),
                          dynamic_axes=dynamic_axes, do_constant_folding=True, dynamo=False)
    if simplify:
        import onnx

        # no_shape_infer: with onnxslim's shape inference the annotated file gave ONNX Runtime
        # outputs up to 3e-3 relative off PyTorch for SparseInst (without it: identical to the
        # unsimplified file; docs/deploy.md)
        onnx.save(onnxslim.slim(str(output_path), no_shape_infer=True), str(output_path))
    return list(net.output_names)


def prepare_input(image: torch.Tensor, input_size: Optional[Tuple[int, int]], pixel_mean: Sequence[float],
                  size_divisibility: int = 32) -> Tuple[np.ndarray, Tuple[int, int]]:
    """An image as the graph takes it.

    Args:
        image: ``uint8`` (or float 0-255) ``(3, h, w)`` RGB, already resized by the test transform
            (:meth:`instseg.engine.Predictor.preprocess`).
        input_size: ``(H, W)`` of a fixed-size graph: an image larger than it is first scaled down
            to fit, keeping its aspect ratio (bilinear, antialiased); ``None`` (a dynamic graph):
            pad to the next multiple of ``size_divisibility``.
        pixel_mean: RGB mean on the 0-255 scale (the padding value: 0 after normalization).
        size_divisibility: for ``input_size=None``.

    Returns:
        ``float32 (1, 3, H, W)`` numpy array and the ``(h, w)`` of the image inside it.

    Raises:
        ValueError: ``image`` is not ``(3, h, w)``.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, h, w), got {tuple(image.shape)}")
    img = image.float()
    h, w = int(img.shape[1]), int(img.shape[2])
    if input_size is None:
        d = max(int(size_divisibility), 1)
        H, W = math.ceil(h / d) * d, math.ceil(w / d) * d
    else:
        H, W = (int(s) for s in input_size)
        if h > H or w > W:
            s = min(H / h, W / w)
            h, w = max(1, min(H, int(round(h * s)))), max(1, min(W, int(round(w * s))))
            img = torch.nn.functional.interpolate(img[None], size=(h, w), mode="bilinear",
                                                  align_corners=False, antialias=True)[0].clamp(0, 255)
    out = torch.tensor(list(pixel_mean), dtype=torch.float32).view(3, 1, 1).expand(3, H, W).clone()
    out[:, :h, :w] = img
    return out[None].numpy(), (h, w)


def run_onnx(onnx_path: str, image: np.ndarray, session=None,
             image_size: Optional[Tuple[int, int]] = None) -> Dict[str, np.ndarray]:
    """ONNX Runtime (``CPUExecutionProvider``) on one ``float32 (1, 3, H, W)`` input: ``{name: array}``.

    Args:
        onnx_path: the file of :func:`export_onnx` (read unless ``session`` is given).
        image: the graph input (:func:`prepare_input`).
        session: an ``onnxruntime.InferenceSession`` of the file, to reuse.
        image_size: ``(h, w)`` of the image inside the padding, fed as ``image_size`` int64
            ``(1, 2)`` when the file has that input.

    Raises:
        ValueError: the file has an ``image_size`` input and none is given.
    """
    import onnxruntime as ort

    sess = session or ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feed = {INPUT_NAME: np.ascontiguousarray(image, dtype=np.float32)}
    if SIZE_INPUT_NAME in {i.name for i in sess.get_inputs()}:
        if image_size is None:
            raise ValueError(f"{onnx_path}: the graph has an input {SIZE_INPUT_NAME!r} ((h, w) of the image inside "
                             "the padding): pass image_size")
        feed[SIZE_INPUT_NAME] = np.asarray([[int(image_size[0]), int(image_size[1])]], dtype=np.int64)
    return dict(zip(names, sess.run(names, feed)))


def _match_instances(ref: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor],
                     score_tol: float) -> Tuple[List[Tuple[int, int]], int, int]:
    """Pair the instances of two finished results of one image: ``(pairs, unmatched, tied)``.

    Instance ``i`` of ``ref`` pairs with instance ``i`` of ``got`` when that one has its label, a
    score within ``score_tol`` and a mask IoU of at least 0.5; each instance left then takes,
    among the unpaired instances of ``got`` with its label and a score within ``score_tol``, the
    one of the highest mask IoU, so that instances of equal scores that the two sorts put in
    another order still pair up. An unpaired instance whose score is within ``score_tol`` of the lowest score the other side kept is
    ``tied`` (the top-k or threshold cut fell between near-equal scores); the others are
    ``unmatched``.
    """
    s_ref, s_got = ref["scores"].float(), got["scores"].float()
    free = torch.ones(len(s_got), dtype=torch.bool)
    pairs: List[Tuple[int, int]] = []

    def eligible(i: int) -> torch.Tensor:
        return free & (got["labels"] == ref["labels"][i]) & ((s_got - s_ref[i]).abs() <= score_tol)

    def iou(i: int, j: int) -> float:
        a, b = ref["masks"][i], got["masks"][j]
        union = int((a | b).sum())
        return 1.0 if union == 0 else int((a & b).sum()) / union

    for i in range(min(len(s_ref), len(s_got))):  # first the same rank, when the masks agree
        if eligible(i)[i] and iou(i, i) >= 0.5:
            free[i] = False
            pairs.append((i, i))
    paired_ref = {i for i, _ in pairs}
    for i in range(len(s_ref)):  # then the best-overlapping eligible one
        if i in paired_ref:
            continue
        cand = torch.nonzero(eligible(i))[:, 0]
        if len(cand) == 0:
            continue
        j = max(cand.tolist(), key=lambda j: iou(i, j)) if len(cand) > 1 else int(cand[0])
        free[j] = False
        pairs.append((i, j))
    pairs.sort()
    paired_ref = {i for i, _ in pairs}
    left = [float(s_ref[i]) for i in range(len(s_ref)) if i not in paired_ref] + [float(v) for v in s_got[free]]
    lowest = [float(s.min()) if len(s) else -float("inf") for s in (s_got, s_ref)]  # none kept: no cut
    sides = [0] * (len(s_ref) - len(pairs)) + [1] * int(free.sum())
    tied = sum(1 for v, side in zip(left, sides) if v <= lowest[side] + score_tol)
    return pairs, len(left) - tied, tied


def verify_onnx(onnx_path: str, model: nn.Module, images: Sequence, mask_key: str = "pred_masks",
                mask_threshold: Optional[float] = None,
                image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
                score_tol: float = 1e-3) -> Dict[str, Dict[str, float]]:
    """Run the ONNX file (ONNX Runtime, CPU) and the PyTorch network (:class:`OnnxNetwork`) on
    the same inputs and compare.

    Args:
        onnx_path: the file of :func:`export_onnx`.
        model: the PyTorch meta-architecture it was exported from.
        images: graph inputs, ``float32 (1, 3, H, W)`` arrays or tensors (:func:`prepare_input`).
        mask_key: the output holding the mask logits ``(1, N, h, w)``.
        mask_threshold: probability threshold of a mask pixel (default ``model.mask_threshold``).
        image_sizes: ``(h, w)`` of each image inside its padded input (the ``image_size`` input;
            default: the whole input).
        score_tol: largest score difference of two paired final instances (scores in [0, 1]).

    Returns:
        ``{output name: {"max_abs": float, "max_rel": float, "max_ref": float}}`` over all
        images, where ``max_ref`` is the largest magnitude of the PyTorch output and ``max_rel``
        the largest absolute difference divided by it
        (a per-element ratio explodes near zero); plus ``"mask_iou": {"min": float, "mean":
        float}``: per image, the IoU between the two sets of masks binarized at
        ``sigmoid(logit) > mask_threshold`` at the network's low resolution (intersection and
        union summed over all queries; 1.0 when both are empty); plus ``"final"``: the two sets
        of outputs finished by :func:`finish_postprocess` (at the size of the image inside the
        padding), instances paired by label, score (within ``score_tol``) and mask overlap
        (:func:`_match_instances`, so near-equal scores sorted in another order still pair):
        ``"instances"`` (PyTorch's count over all images), ``"count_mismatch"`` (images whose
        counts differ), ``"unmatched"`` (instances of either side without a partner; the CLI fails
        above 1 % of ``"instances"``: a model that selects on one score and reports another, as
        SparseInst's mask rescoring, can drop a different near-tied instance on each side),
        ``"tied_at_cut"`` (unpaired ones within ``score_tol`` of the other side's lowest kept score:
        the top-k or threshold cut fell between near-equal scores), over the pairs
        ``"max_score_diff"``, ``"max_box_diff"`` (pixels) and
        ``"mask_iou_min"`` / ``"mask_iou_mean"`` (per image, intersection and union summed over
        its instances as for the low-resolution IoU; 1.0 when both are empty) and
        ``"instance_mask_iou_min"`` (the smallest per-instance IoU, for information: a mask of a
        dozen pixels whose logits sit at the threshold loses 8 % IoU for one flipped pixel).

    Raises:
        ValueError: no images; ``image_sizes`` of another length; the graph's outputs are not the
            PyTorch ones.
    """
    import onnxruntime as ort

    if len(images) == 0:
        raise ValueError("verify_onnx: no images")
    if image_sizes is not None and len(image_sizes) != len(images):
        raise ValueError(f"verify_onnx: {len(images)} images but {len(image_sizes)} image_sizes")
    thr = float(model.mask_threshold if mask_threshold is None else mask_threshold)
    logit_thr = math.log(thr / (1.0 - thr))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    model.eval()
    net = OnnxNetwork(model, output_names=names).eval()
    stats = {n: {"max_abs": 0.0, "max_ref": 0.0} for n in names}
    ious = []
    final = {"instances": 0, "count_mismatch": 0, "unmatched": 0, "tied_at_cut": 0, "max_score_diff": 0.0,
             "max_box_diff": 0.0}
    final_ious: List[float] = []
    instance_ious: List[float] = []
    for j, image in enumerate(images):
        x = torch.as_tensor(np.asarray(image, dtype=np.float32))
        hw = tuple(int(s) for s in (x.shape[-2:] if image_sizes is None else image_sizes[j]))
        got = run_onnx(onnx_path, x.numpy(), session=sess, image_size=hw)
        device = model.pixel_mean.device
        with torch.no_grad():
            outs = net(x.to(device), torch.tensor([hw], dtype=torch.int64, device=device))
            ref = dict(zip(names, (t.float().cpu().numpy() for t in outs)))
        for n in names:
            if got[n].shape != ref[n].shape:
                raise ValueError(f"{onnx_path}: output {n} has shape {got[n].shape}, PyTorch {ref[n].shape}")
            stats[n]["max_abs"] = max(stats[n]["max_abs"], float(np.abs(got[n] - ref[n]).max(initial=0.0)))
            stats[n]["max_ref"] = max(stats[n]["max_ref"], float(np.abs(ref[n]).max(initial=0.0)))
        if mask_key in names:
            a, b = got[mask_key] > logit_thr, ref[mask_key] > logit_thr
            union = np.logical_or(a, b).sum()
            ious.append(1.0 if union == 0 else float(np.logical_and(a, b).sum() / union))
        padded = tuple(int(s) for s in x.shape[-2:])
        r_got = finish_postprocess(model, got, [hw], padded)[0]
        r_ref = finish_postprocess(model, {n: t.cpu() for n, t in zip(names, outs)}, [hw], padded)[0]
        pairs, unmatched, tied = _match_instances(r_ref, r_got, score_tol)
        final["instances"] += len(r_ref["scores"])
        final["count_mismatch"] += int(len(r_got["scores"]) != len(r_ref["scores"]))
        final["unmatched"] += unmatched
        final["tied_at_cut"] += tied
        inter = union = 0
        for i, j in pairs:
            final["max_score_diff"] = max(final["max_score_diff"], float(abs(r_got["scores"][j] - r_ref["scores"][i])))
            final["max_box_diff"] = max(final["max_box_diff"], float((r_got["boxes"][j] - r_ref["boxes"][i]).abs().max()))
            a, b = r_got["masks"][j], r_ref["masks"][i]
            n_i, n_u = int((a & b).sum()), int((a | b).sum())
            inter, union = inter + n_i, union + n_u
            instance_ious.append(1.0 if n_u == 0 else n_i / n_u)
        final_ious.append(1.0 if union == 0 else inter / union)
    result: Dict[str, Dict[str, float]] = {
        n: {"max_abs": s["max_abs"], "max_rel": s["max_abs"] / max(s["max_ref"], 1e-12), "max_ref": s["max_ref"]}
        for n, s in stats.items()
    }
    if ious:
        result["mask_iou"] = {"min": min(ious), "mean": float(np.mean(ious))}
    final["mask_iou_min"] = min(final_ious, default=1.0)
    final["mask_iou_mean"] = float(np.mean(final_ious)) if final_ious else 1.0
    final["instance_mask_iou_min"] = min(instance_ious, default=1.0)
    result["final"] = final
    return result


def finish_postprocess(model: nn.Module, outputs: Dict[str, np.ndarray], image_sizes: Sequence[Tuple[int, int]],
                       padded_size: Tuple[int, int],
                       original_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> List[Dict[str, torch.Tensor]]:
    """The graph's outputs -> the data-contract dicts, by the model's ``export_postprocess``.

    Args:
        model: the meta-architecture the graph came from: its ``export_postprocess(outputs,
            batched_inputs, image_sizes, padded_size)`` (default ``inference``; thresholds,
            top-k, mask upsampling / pasting, crop, resize, boxes).
        outputs: ``{name: array}`` of :func:`run_onnx` (batch ``B``).
        image_sizes: ``(h, w)`` of each image inside the padded input (:func:`prepare_input`).
        padded_size: ``(H, W)`` of the graph's input.
        original_sizes: ``(height, width)`` to return the masks at (default ``image_sizes``).

    Returns:
        One dict per image: ``scores`` float32 ``(K,)``, ``labels`` int64 ``(K,)``, ``masks`` bool
        ``(K, height, width)``, ``boxes`` float32 ``(K, 4)`` xyxy (docs/architecture.md, "Data
        contract"), on the CPU.

    Raises:
        TypeError: the model has neither ``export_postprocess`` nor ``inference``.
    """
    post = getattr(model, "export_postprocess", None)
    post = post if callable(post) else getattr(model, "inference", None)
    if not callable(post):
        raise TypeError(f"{type(model).__name__} has no export_postprocess / inference(outputs, batched_inputs, "
                        "image_sizes, padded_size)")
    sizes = [(int(h), int(w)) for h, w in image_sizes]
    orig = sizes if original_sizes is None else [(int(h), int(w)) for h, w in original_sizes]
    device = model.pixel_mean.device
    tensors = {k: torch.as_tensor(np.asarray(v)).to(device) for k, v in outputs.items()}
    batched = [{"height": h, "width": w} for h, w in orig]
    with torch.no_grad():
        results = post(tensors, batched, sizes, tuple(int(s) for s in padded_size))
    return [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in results]


class OnnxRuntimeModel(nn.Module):
    """An exported file behind the data-contract interface, ``model(list_of_dicts) -> list_of_dicts``,
    so that :func:`instseg.evaluation.timing.benchmark_model` times it like the PyTorch model.

    One call, per input dict: :func:`prepare_input` (to the graph's fixed input size, or padded to
    ``MODEL.SIZE_DIVISIBILITY`` for a dynamic graph), the ONNX Runtime session run
    (``CPUExecutionProvider``), and :func:`finish_postprocess` with ``model`` (the meta-architecture
    the file came from, used only for its ``export_postprocess`` and pixel mean; its weights play
    no part).

    Args:
        onnx_path: the file of :func:`export_onnx`.
        model: the PyTorch meta-architecture (its post-processing code); kept as a submodule, on
            the CPU.
        intra_op_threads: ONNX Runtime's intra-op threads (default ``torch.get_num_threads()``, so
            that both backends use the same number of threads).

    Attributes:
        input_size: ``(H, W)`` of a fixed-size graph, ``None`` when its height / width are dynamic.
        intra_op_threads: the threads the session was created with.

    Raises:
        ImportError: onnxruntime is not installed (``pip install .[export]``).
        FileNotFoundError: ``onnx_path`` does not exist.
        ValueError: the graph has no input named ``image`` of rank 4.
    """

    def __init__(self, onnx_path: str, model: nn.Module, intra_op_threads: Optional[int] = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("onnxruntime is not installed: pip install .[export] (onnx, onnxruntime)") from e
        import os

        if not os.path.isfile(str(onnx_path)):
            raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
        self.onnx_path = str(onnx_path)
        self.model = model.cpu().eval()
        self.intra_op_threads = int(intra_op_threads or torch.get_num_threads())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        self.session = ort.InferenceSession(self.onnx_path, sess_options=opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_NAME not in inputs or len(inputs[INPUT_NAME].shape) != 4:
            raise ValueError(f"{self.onnx_path}: expected an input {INPUT_NAME!r} of shape (1, 3, H, W), "
                             f"got {[(i.name, i.shape) for i in inputs.values()]}")
        hw = inputs[INPUT_NAME].shape[2:]
        self.input_size = tuple(int(s) for s in hw) if all(isinstance(s, int) for s in hw) else None
        self.pixel_mean = [float(v) for v in model.pixel_mean.flatten().tolist()]
        self.size_divisibility = int(getattr(model, "size_divisibility", 32) or 1)

    def check_inputs(self, inputs: Sequence[Dict]) -> None:
        """Raise ``ValueError`` when an image (``"image"`` ``(3, h, w)``) is larger than a fixed
        graph's input size (it would be scaled down, so not what the PyTorch model sees)."""
        if self.input_size is None:
            return
        H, W = self.input_size
        for x in inputs:
            h, w = (int(s) for s in x["image"].shape[-2:])
            if h > H or w > W:
                name = x.get("file_name", "an image")
                raise ValueError(
                    f"{self.onnx_path}: input size {H}x{W} is smaller than the resized test image {name} "
                    f"({h}x{w}); export with a larger --input-size (at least INPUT.MAX_SIZE_TEST square)")

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        results = []
        for x in batched_inputs:
            arr, hw = prepare_input(x["image"], self.input_size, self.pixel_mean, self.size_divisibility)
            outs = run_onnx(self.onnx_path, arr, session=self.session, image_size=hw)
            h0, w0 = x.get("height", hw[0]), x.get("width", hw[1])
            results += finish_postprocess(self.model, outs, [hw], tuple(arr.shape[-2:]), [(h0, w0)])
        return results
