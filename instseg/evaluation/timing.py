"""Speed, parameter and FLOP measurement (the harness behind ``instseg-benchmark`` /
``tools/benchmark_fps.py``).

What is timed, as the SparseInst/FastInst papers time it: the whole ``model([input])`` call at
batch size 1 — pre-processing (host-to-device copy of the uint8 image, normalization, padding),
the network, and post-processing (mask upsampling to the original size, thresholding). Reading
and decoding images is excluded: inputs are pre-decoded ``uint8 (3, H, W)`` tensors.

The timed inputs are what evaluation feeds the model: :func:`build_test_inputs` passes every
image (a file, a dataset's image, or a synthetic one) through the test mapper
(``DatasetMapper(cfg, is_train=False)``: decode to RGB, then the antialiased
``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``), before any timing.
:func:`benchmark_from_config` is the one call behind the tool: model from the config, those
inputs, :func:`benchmark_model`, parameters and FLOPs, in one report.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import statistics
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "benchmark_model",
    "benchmark_from_config",
    "build_test_inputs",
    "count_parameters",
    "count_flops",
    "device_description",
    "format_benchmark_report",
    "StageTimer",
    "benchmark_interleaved",
    "summarize_times",
    "peak_memory_mb",
    "STAGES",
]

logger = logging.getLogger(__name__)

TIMED = "pre-processing + network + post-processing (data loading excluded)"
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_description(device: Union[str, torch.device]) -> str:
    """Human-readable device: the GPU's name, or the CPU model with torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(index)} (cuda:{index})"
    if device.type == "cpu":
        return f"{_cpu_name()} ({torch.get_num_threads()} threads, {os.cpu_count()} logical cores)"
    return str(device)


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _run_device(model: nn.Module, device: Optional[Union[str, torch.device]]) -> torch.device:
    """``device`` (default: where ``model``'s parameters are), a bare ``cuda`` made the current
    CUDA device, so that synchronization and memory statistics address one GPU."""
    dev = torch.device(device) if device is not None else _model_device(model)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _check_precision(precision: str) -> None:
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _input_size(inputs: Sequence[Dict]):
    sizes = [tuple(int(s) for s in x["image"].shape[-2:]) for x in inputs]
    distinct = sorted(set(sizes))
    if len(distinct) == 1:
        return list(distinct[0]), None
    hs = [s[0] for s in sizes]
    ws = [s[1] for s in sizes]
    mean = [int(round(statistics.mean(hs))), int(round(statistics.mean(ws)))]
    note = (f"{len(distinct)} distinct sizes: H in [{min(hs)}, {max(hs)}], W in "
            f"[{min(ws)}, {max(ws)}]; input_size is the mean")
    return mean, note


def benchmark_model(
    model: nn.Module,
    inputs: List[Dict],
    num_warmup: int = 10,
    num_iter: int = 100,
    precision: str = "fp32",
    channels_last: bool = False,
    device: Optional[Union[str, torch.device]] = None,
) -> Dict:
    """Time ``model([x])`` at batch size 1.

    Each iteration feeds ``inputs[i % len(inputs)]``; ``num_warmup`` untimed iterations come
    first. Every timed call is bracketed by ``torch.cuda.synchronize`` on CUDA, and measured with
    ``time.perf_counter``. The model runs in eval mode under ``torch.no_grad()``; its training
    mode is restored afterwards (it stays on ``device`` and, with ``channels_last``, in that memory
    format).

    Args:
        model: follows the data contract of docs/architecture.md (``model(list_of_dicts) -> list_of_dicts``).
        inputs: input dicts with ``"image"``: ``uint8 (3, H, W)`` RGB (already resized to the test
            size), ``"height"``, ``"width"``; left where they are (the model moves them).
        num_warmup: untimed iterations (>= 0).
        num_iter: timed iterations (>= 1).
        precision: ``"fp32"``, or ``"fp16"``/``"bf16"`` through ``torch.autocast``.
        channels_last: convert the model to ``torch.channels_last`` memory format.
        device: where the model runs; default: where its parameters are.

    Returns:
        ``{"fps", "ms_per_image" (mean), "ms_std" (sample std), "ms_median", "num_warmup",
        "num_iter", "batch_size": 1, "device", "precision", "channels_last", "input_size": [H, W]
        (the mean when sizes differ, explained in "input_size_note"), "timed", "torch"}`` plus
        ``"max_memory_mb"`` on CUDA. ``fps = num_iter / total timed seconds``.

    Raises:
        ValueError: empty ``inputs``, ``num_iter < 1``, ``num_warmup < 0`` or unknown precision.
    """
    if not inputs:
        raise ValueError("benchmark_model: no inputs")
    if num_iter < 1 or num_warmup < 0:
        raise ValueError(f"need num_iter >= 1 and num_warmup >= 0, got {num_iter}, {num_warmup}")
    _check_precision(precision)
    device = _run_device(model, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    was_training = model.training
    model.eval()
    times: List[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.no_grad(), _autocast(device, precision):
            for i in range(num_warmup):
                model([inputs[i % len(inputs)]])
            _sync(device)
            for i in range(num_iter):
                x = inputs[i % len(inputs)]
                _sync(device)
                t0 = time.perf_counter()
                model([x])
                _sync(device)
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)

    total = sum(times)
    input_size, note = _input_size(inputs[: min(len(inputs), num_iter)])
    result = {
        "fps": num_iter / total if total > 0 else math.inf,
        "ms_per_image": 1000.0 * statistics.mean(times),
        "ms_std": 1000.0 * statistics.stdev(times) if len(times) > 1 else 0.0,
        "ms_median": 1000.0 * statistics.median(times),
        "num_warmup": int(num_warmup),
        "num_iter": int(num_iter),
        "batch_size": 1,
        "device": device_description(device),
        "precision": precision,
        "channels_last": bool(channels_last),
        "input_size": input_size,
        "timed": TIMED,
        "torch": torch.__version__,
    }
    if note:
        result["input_size_note"] = note
    if device.type == "cuda":
        result["max_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, trainable and frozen (buffers such as FrozenBN statistics
    excluded; a parameter shared by two modules counted once)."""
    return int(sum(p.numel() for p in model.parameters()))


class _ContractAdapter(nn.Module):
    """Traceable wrapper: one image tensor in, the flattened tensors of ``model([...])`` out."""

    def __init__(self, model: nn.Module, template: Dict):
        super().__init__()
        self.model = model
        self.template = {k: v for k, v in template.items() if k != "image"}

    def forward(self, image: torch.Tensor):
        inp = dict(self.template)
        inp["image"] = image
        inp.setdefault("height", int(image.shape[-2]))
        inp.setdefault("width", int(image.shape[-1]))
        return tuple(_flatten_tensors(self.model([inp])))


class _FlopsForwardAdapter(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return tuple(_flatten_tensors(self.model.flops_forward(images)))


def _flatten_tensors(x) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x, key=str) for t in _flatten_tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flatten_tensors(v)]
    return []


def count_flops(model: nn.Module, inputs: Union[torch.Tensor, Dict, List[Dict]]) -> float:
    """GFLOPs of one forward pass, counted by :class:`fvcore.nn.FlopCountAnalysis`.

    fvcore's convention: one multiply-add is one FLOP (a ``Conv2d(3, 8, 3)`` on ``1x3x16x16``
    with padding 1 counts ``3*8*9*16*16``). Ops fvcore has no handle for count 0; they are
    listed at DEBUG level and their number logged at INFO (no per-op warnings).

    What is counted:
      * ``inputs`` is a tensor: ``model.flops_forward(inputs)`` if the model has it, else
        ``model(inputs)``.
      * ``inputs`` is an input dict or a list of them (the first is used, batch 1): if the model
        has ``flops_forward``, it receives the normalized, padded float batch
        ``(1, 3, Hp, Wp)`` (from ``model.preprocess_images`` when present, else the raw image as
        float); this is the network without post-processing. Otherwise the full ``model([x])``
        call is traced (pre- and post-processing included).

    The model is traced in eval mode under ``torch.no_grad()``; its training mode is restored.

    Returns:
        GFLOPs (``total / 1e9``), a float.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import scripts a function (deprecated jit)
        from fvcore.nn import FlopCountAnalysis

    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(inputs, torch.Tensor):
                if hasattr(model, "flops_forward"):
                    net, args = _FlopsForwardAdapter(model), (inputs.to(device),)
                else:
                    net, args = model, (inputs.to(device),)
            else:
                first = inputs if isinstance(inputs, dict) else inputs[0]
                if hasattr(model, "flops_forward"):
                    if hasattr(model, "preprocess_images"):
                        images = model.preprocess_images([first])[0]
                    else:
                        images = first["image"].to(device).float()[None]
                    net, args = _FlopsForwardAdapter(model), (images,)
                else:
                    net, args = _ContractAdapter(model, first), (first["image"].to(device),)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings from data-dependent code
                analysis = FlopCountAnalysis(net, args)
                analysis.unsupported_ops_warnings(False)
                analysis.uncalled_modules_warnings(False)
                analysis.tracer_warnings("none")
                total = analysis.total()
                skipped = analysis.unsupported_ops()
    finally:
        model.train(was_training)
    if skipped:
        logger.info(
            "count_flops: %d op calls of %d kinds not counted by fvcore (counted as 0)",
            sum(skipped.values()), len(skipped),
        )
        logger.debug("count_flops: skipped ops: %s", dict(skipped))
    return float(total) / 1e9


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _map_readable(mapper, dicts: Sequence[Dict], num: int) -> List[Dict]:
    """``mapper(d)`` for the first ``num`` dicts whose image decodes (others warned and skipped)."""
    from ..data import ImageDecodeError

    inputs: List[Dict] = []
    for d in dicts:
        if len(inputs) >= num:
            break
        try:
            inputs.append(mapper(d))
        except ImageDecodeError as e:
            logger.warning("%s; skipped", e)
    return inputs


def build_test_inputs(
    cfg,
    images: Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]] = None,
    dataset: Optional[str] = None,
    input_size: Optional[Sequence[int]] = None,
    num_images: int = 10,
    seed: int = 0,
) -> Tuple[List[Dict], str]:
    """The model inputs evaluation would feed for some images, decoded and resized before timing.

    Every image goes through the test mapper, ``DatasetMapper(cfg, is_train=False)`` (what
    :func:`instseg.data.build_test_loader` maps the test set with): decode to RGB, then the
    antialiased ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``. One source:

    * ``images``: a folder (its image files sorted by name) or a list of image files; files that
      cannot be decoded are skipped with a warning;
    * ``dataset``: a registered dataset name (its images in dataset order, as evaluated);
    * neither: ``num_images`` synthetic random images of ``input_size`` ``(H, W)`` (default
      ``INPUT.MIN_SIZE_TEST`` square), written losslessly to a temporary folder and mapped like
      files, so their original size is ``input_size`` and the model sees them after the test
      resize.

    Returns:
        ``(inputs, description)``: up to ``num_images`` mapper outputs (``"image"``: ``uint8
        (3, H, W)`` after the test resize, ``"height"``/``"width"``: the original size,
        ``"image_id"``, ``"file_name"``), and a one-line description of where they came from.

    Raises:
        ValueError: more than one source, ``input_size`` with ``images``/``dataset``, no
            ``input_size`` while ``INPUT.MIN_SIZE_TEST <= 0``, or ``num_images < 1``.
        FileNotFoundError: ``images`` is not a folder, or none of its images decodes.
        KeyError: ``dataset`` is not registered.
    """
    from ..data import DatasetMapper, get_dataset_dicts

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if images and dataset:
        raise ValueError("build_test_inputs: give images or dataset, not both")
    if input_size and (images or dataset):
        raise ValueError("input_size applies to synthetic images; real images are resized with "
                         "INPUT.MIN_SIZE_TEST / INPUT.MAX_SIZE_TEST")
    mapper = DatasetMapper(cfg, is_train=False)
    if images:
        if isinstance(images, (str, os.PathLike)):
            folder = os.fspath(images)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"images: not a folder: {folder}")
            files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
            where = folder
        else:
            files = [os.fspath(f) for f in images]
            where = f"{len(files)} listed files"
        inputs = _map_readable(mapper, [{"file_name": f, "image_id": i} for i, f in enumerate(files)],
                               num_images)
        if not inputs:
            raise FileNotFoundError(f"images: no readable image in {where}")
        return inputs, f"{len(inputs)} images from {where}"
    if dataset:
        inputs = _map_readable(mapper, get_dataset_dicts([dataset], filter_empty=False), num_images)
        if not inputs:
            raise FileNotFoundError(f"dataset {dataset!r}: no readable image")
        return inputs, f"{len(inputs)} images of dataset {dataset}"

    import tempfile

    import cv2

    if input_size:
        h, w = (int(s) for s in input_size)
    else:
        short = int(cfg.INPUT.MIN_SIZE_TEST)
        if short <= 0:
            raise ValueError("INPUT.MIN_SIZE_TEST <= 0 (no test resize): give input_size")
        h = w = short
    if h < 1 or w < 1:
        raise ValueError(f"input_size must be positive, got {(h, w)}")
    g = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="instseg_benchmark_") as tmp:
        dicts = []
        for i in range(num_images):
            pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
            path = os.path.join(tmp, f"synthetic_{i}.png")
            if not cv2.imwrite(path, pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
                raise OSError(f"cannot write {path}")
            dicts.append({"file_name": path, "image_id": i, "height": h, "width": w})
        inputs = [mapper(d) for d in dicts]
    for x in inputs:
        x["file_name"] = os.path.basename(x["file_name"])  # the temporary file is gone
    return inputs, f"{len(inputs)} synthetic random images of {h} x {w} (before the test resize)"


def benchmark_from_config(
    cfg,
    images: Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]] = None,
    dataset: Optional[str] = None,
    input_size: Optional[Sequence[int]] = None,
    num_images: Optional[int] = None,
    num_iter: int = 100,
    num_warmup: int = 10,
    precision: str = "fp32",
    channels_last: bool = False,
    flops: bool = True,
    model: Optional[nn.Module] = None,
    weights: Optional[str] = None,
    onnx: Optional[str] = None,
) -> Dict:
    """Benchmark a config's model on the inputs evaluation feeds it (the call behind the tool).

    1. inputs: :func:`build_test_inputs` (``images`` / ``dataset`` / synthetic ``input_size``),
       ``num_images`` of them (default: ``num_iter`` real images, or ``min(num_iter, 10)``
       synthetic ones), decoded and test-resized before anything is timed;
    2. the model: ``model`` as given, else ``build_model(cfg)``; then ``weights`` are loaded
       (default when the model is built here: ``MODEL.WEIGHTS``; none: random initialization);
    3. :func:`benchmark_model` (on ``MODEL.DEVICE``, else where the model is), parameters and,
       with ``flops``, :func:`count_flops` on the first input (a tracing failure is reported in
       ``"flops_error"``, the timing stays valid).

    ``torch.backends.cudnn.benchmark`` is set to ``CUDNN_BENCHMARK``.

    With ``onnx`` (a file of :func:`instseg.export.export_onnx`), what is timed is that file in
    ONNX Runtime (``CPUExecutionProvider``, ``torch.get_num_threads()`` intra-op threads), wrapped
    in :class:`instseg.export.OnnxRuntimeModel`: per timed call, ``prepare_input`` to the graph's
    input size, the session run and ``finish_postprocess`` with the model of step 2 (only its
    post-processing code: random weights are allowed and logged). Same inputs, warm-up and
    statistics; fp32 on the CPU only. Parameters and FLOPs are those of the PyTorch network.
    The report adds ``"backend": "onnxruntime"``, ``"onnx"``, ``"onnx_input_size"`` ([H, W], or
    None when dynamic), ``"ort_threads"`` and ``"onnxruntime"`` (its version).

    Returns:
        ``{"meta_architecture", "weights", "num_classes", "images" (where the inputs came from),
        "test_resize": [MIN_SIZE_TEST, MAX_SIZE_TEST], **benchmark_model's result, "params",
        "params_m", "gflops" (None when skipped or failed), "flops_input_size", "flops_counted"
        or "flops_error"}``.

    Raises:
        ValueError: ``onnx`` with ``precision`` other than fp32 or ``channels_last``; an ONNX input
            size smaller than a resized test image (:meth:`instseg.export.OnnxRuntimeModel.check_inputs`).
        ImportError / FileNotFoundError: ``onnx`` without onnxruntime / a missing file.
    """
    if onnx and (precision != "fp32" or channels_last):
        raise ValueError("the onnxruntime backend times fp32 on the CPU: no fp16 / bf16 / channels_last")
    if num_iter < 1 or num_warmup < 0:
        raise ValueError(f"need num_iter >= 1 and num_warmup >= 0, got {num_iter}, {num_warmup}")
    if num_images is None:
        num_images = num_iter if (images or dataset) else min(num_iter, 10)
    inputs, description = build_test_inputs(cfg, images=images, dataset=dataset,
                                            input_size=input_size, num_images=num_images)
    torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    if model is None:
        from ..modeling import build_model

        model = build_model(cfg)
        if weights is None:
            weights = cfg.MODEL.WEIGHTS
    if weights:
        from ..checkpoint import load_checkpoint

        load_checkpoint(model, weights)
    model.eval()
    if onnx:
        from ..export import OnnxRuntimeModel

        if not weights:
            logger.info("onnxruntime backend: the PyTorch model is randomly initialized; it only "
                        "supplies the post-processing code, its weights play no part in the timing")
        timed = OnnxRuntimeModel(onnx, model)
        timed.check_inputs(inputs)
        print(f"ONNX Runtime: CPUExecutionProvider, {timed.intra_op_threads} intra-op threads "
              "(torch.get_num_threads())")
        result = benchmark_model(timed, inputs, num_warmup=num_warmup, num_iter=num_iter, device="cpu")
        import onnxruntime

        result.update({"backend": "onnxruntime", "onnx": str(onnx),
                       "onnx_input_size": list(timed.input_size) if timed.input_size else None,
                       "ort_threads": timed.intra_op_threads, "onnxruntime": onnxruntime.__version__})
    else:
        result = benchmark_model(model, inputs, num_warmup=num_warmup, num_iter=num_iter,
                                 precision=precision, channels_last=channels_last,
                                 device=cfg.MODEL.DEVICE or None)
    report = {
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "weights": weights or "",
        "num_classes": int(cfg.MODEL.NUM_CLASSES),
        "images": description,
        "test_resize": [int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)],
        **result,
        "params": count_parameters(model),
    }
    report["params_m"] = report["params"] / 1e6
    report["gflops"] = None
    if not flops:
        report["flops_error"] = "skipped"
        return report
    try:
        report["gflops"] = count_flops(model, inputs[:1])
        report["flops_input_size"] = list(inputs[0]["image"].shape[-2:])
        report["flops_counted"] = ("network (flops_forward)" if hasattr(model, "flops_forward")
                                   else "full model() call")
    except Exception as e:  # tracing can fail on exotic ops; timing is still valid
        logger.warning("FLOP count failed: %s", e)
        report["flops_error"] = f"{type(e).__name__}: {e}"
    return report


def format_benchmark_report(report: Dict) -> str:
    """The report of :func:`benchmark_from_config` as printed by the tool."""
    b = report
    h, w = b["input_size"]
    config = f" ({b['config_file']})" if b.get("config_file") else ""
    resize = b.get("test_resize")
    resize = f"test resize {resize[0]}/{resize[1]}" if resize else "test resize"
    lines = [
        f"Benchmark of {b['meta_architecture']}{config}",
        f"  weights:       {b['weights'] or '(random initialization)'}",
    ]
    if b.get("backend") == "onnxruntime":
        size = b.get("onnx_input_size")
        size = f"{size[0]} x {size[1]} input" if size else "dynamic input"
        lines += [
            f"  backend:       onnxruntime {b.get('onnxruntime', '')} (CPUExecutionProvider, "
            f"{b['ort_threads']} intra-op threads)",
            f"  onnx:          {b['onnx']} ({size})",
        ]
    lines += [
        f"  device:        {b['device']}",
        f"  precision:     {b['precision']}" + ("  (channels_last)" if b["channels_last"] else ""),
        f"  input size:    {h} x {w} (H x W, after the {resize}; {b['images']})",
    ]
    if b.get("input_size_note"):
        lines.append(f"                 {b['input_size_note']}")
    lines += [
        f"  timed:         {b['timed']}",
        f"  warm-up:       {b['num_warmup']} iterations",
        f"  iterations:    {b['num_iter']} (batch size 1)",
        f"  FPS:           {b['fps']:.2f}",
        f"  ms/image:      {b['ms_per_image']:.2f} ± {b['ms_std']:.2f} (mean ± std; median "
        f"{b['ms_median']:.2f})",
        f"  parameters:    {b['params'] / 1e6:.2f} M ({b['params']:,})",
    ]
    if b.get("gflops") is not None:
        fh, fw = b["flops_input_size"]
        lines.append(f"  GFLOPs:        {b['gflops']:.2f} (fvcore, 1 multiply-add = 1 FLOP; "
                     f"{b['flops_counted']} on a {fh} x {fw} input)")
    else:
        lines.append(f"  GFLOPs:        n/a ({b.get('flops_error', 'skipped')})")
    if b.get("max_memory_mb") is not None:
        lines.append(f"  max GPU memory: {b['max_memory_mb']:.0f} MiB")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- zoo pieces
# Used by instseg-benchmark-zoo (instseg/tools/benchmark_zoo.py); benchmark_model above is unchanged.

STAGES = ("preprocess", "network", "postprocess")


class StageTimer:
    """Time one ``model([x])`` call and split it into pre-processing, network and post-processing.

    The split uses the two calls that every meta-architecture's ``forward`` makes through the data
    contract (docs/architecture.md): ``self.preprocess_images(batched_inputs)`` (normalize, pad:
    :meth:`instseg.modeling.MetaArchBase.preprocess_images`) and ``self.inference(...)`` (what turns
    the network's outputs into the result dicts: score selection, top-k, the mask branch of models
    that run it on the kept instances only, mask upsampling / pasting to the original size,
    thresholding). While the timer is entered, both are wrapped on the instance (instance attributes
    that shadow the methods; removed on exit). Per call:

    * ``preprocess``: time inside ``preprocess_images``;
    * ``postprocess``: time inside ``inference``;
    * ``network``: the rest of the call (``total - preprocess - postprocess``: backbone, neck,
      heads, and the few operations of ``forward`` between the two calls).

    A model without one of the two methods gets ``None`` for that stage and the network takes its
    time. Every boundary is bracketed by ``torch.cuda.synchronize`` on CUDA.

    Args:
        model: an eval-mode model following the data contract.
        device: where it runs (synchronized on CUDA); default: where its parameters are.
        clock: seconds as a float (default ``time.perf_counter``; tests pass a fake clock).
    """

    PRE = "preprocess_images"
    POST = "inference"

    def __init__(self, model: nn.Module, device: Optional[Union[str, torch.device]] = None, clock=None):
        self.model = model
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.clock = clock or time.perf_counter
        self._acc: Dict[str, float] = {"preprocess": 0.0, "postprocess": 0.0}
        self._hits: Dict[str, int] = {"preprocess": 0, "postprocess": 0}
        self._installed: List[Tuple[str, object]] = []
        self.last_output = None

    def _wrap(self, stage: str, fn):
        def wrapped(*args, **kwargs):
            _sync(self.device)
            t0 = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self._acc[stage] += self.clock() - t0
                self._hits[stage] += 1
        return wrapped

    def __enter__(self) -> "StageTimer":
        for name, stage in ((self.PRE, "preprocess"), (self.POST, "postprocess")):
            fn = getattr(self.model, name, None)
            if callable(fn):
                previous = self.model.__dict__.get(name, _MISSING)
                self.model.__dict__[name] = self._wrap(stage, fn)
                self._installed.append((name, previous))
        return self

    def __exit__(self, *exc) -> None:
        for name, previous in reversed(self._installed):
            if previous is _MISSING:
                self.model.__dict__.pop(name, None)
            else:
                self.model.__dict__[name] = previous
        self._installed = []

    def call(self, x: Dict) -> Dict[str, Optional[float]]:
        """Run ``model([x])`` once; returns seconds: ``{"total", "preprocess", "network",
        "postprocess"}`` (a stage whose method the model lacks, or that was not called, is None).
        The model's output is kept in ``self.last_output``.

        Raises:
            RuntimeError: called outside ``with StageTimer(...)``.
        """
        if not self._installed and (callable(getattr(self.model, self.PRE, None))
                                    or callable(getattr(self.model, self.POST, None))):
            raise RuntimeError("StageTimer.call() needs the timer entered: with StageTimer(model) as t: t.call(x)")
        self._acc = {"preprocess": 0.0, "postprocess": 0.0}
        self._hits = {"preprocess": 0, "postprocess": 0}
        _sync(self.device)
        t0 = self.clock()
        out = self.model([x])
        _sync(self.device)
        total = self.clock() - t0
        self.last_output = out
        pre = self._acc["preprocess"] if self._hits["preprocess"] else None
        post = self._acc["postprocess"] if self._hits["postprocess"] else None
        return {"total": total, "preprocess": pre, "postprocess": post,
                "network": total - (pre or 0.0) - (post or 0.0)}


_MISSING = object()


def summarize_times(times_s: Sequence[float]) -> Dict[str, float]:
    """Statistics of per-call seconds, in milliseconds: ``{"ms_mean", "ms_median", "ms_p90",
    "ms_std" (sample std, 0 for one value), "fps" (1000 / ms_mean)}``. ``ms_p90`` is the 90th
    percentile with linear interpolation between order statistics (numpy's default).

    Raises:
        ValueError: no times.
    """
    import numpy as np

    if not len(times_s):
        raise ValueError("summarize_times: no times")
    ms = np.asarray(times_s, dtype=np.float64) * 1000.0
    mean = float(ms.mean())
    return {"ms_mean": mean, "ms_median": float(np.median(ms)), "ms_p90": float(np.percentile(ms, 90)),
            "ms_std": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
            "fps": 1000.0 / mean if mean > 0 else math.inf}


def benchmark_interleaved(
    entries: Sequence[Tuple[nn.Module, List[Dict]]],
    num_warmup: int = 2,
    rounds: int = 5,
    iters_per_round: int = 2,
    precision: str = "fp32",
    device: Optional[Union[str, torch.device]] = None,
    clock=None,
    on_iteration=None,
) -> List[Dict]:
    """Time several models in one process, interleaved so that machine noise hits all alike.

    First every model runs ``num_warmup`` untimed calls (model by model). Then ``rounds`` rounds;
    in round ``r`` model 0 runs ``iters_per_round`` timed calls, then model 1, and so on. Model
    ``j``'s ``i``-th timed call feeds ``inputs_j[i % len(inputs_j)]``. Each call is a
    :meth:`StageTimer.call` (batch 1, synchronized, pre- and post-processing included, split
    into the three stages). Eval mode and ``torch.no_grad()``; training modes restored afterwards.

    Args:
        entries: ``(model, inputs)`` pairs; inputs as for :func:`benchmark_model`.
        num_warmup: untimed calls per model (>= 0).
        rounds, iters_per_round: >= 1 each; every model gets ``rounds * iters_per_round`` timed calls.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (autocast), for every model, or a list of
            those, one per entry (variants of one model side by side).
        device: where the models run (each is moved there); default: where each one's parameters are.
        clock: passed to :class:`StageTimer`.
        on_iteration: called as ``on_iteration(model_index, round_index, iteration_in_round)``
            after each timed call (the schedule, for logging or tests).

    Returns:
        One dict per entry: ``{"times_s": [...], "preprocess_s", "network_s", "postprocess_s":
        [...] (None entries when the stage is not measured), "instances": [...] (instances
        returned per timed call, None without ``"scores"``), "mean_instances", "num_iter",
        "num_warmup", "shares": {stage: fraction of the summed total time, or None}} |
        summarize_times(times_s)``.

    Raises:
        ValueError: no entries, an entry without inputs, bad counts or an unknown precision.
    """
    if not entries:
        raise ValueError("benchmark_interleaved: no models")
    if any(not inputs for _, inputs in entries):
        raise ValueError("benchmark_interleaved: every model needs inputs")
    if rounds < 1 or iters_per_round < 1 or num_warmup < 0:
        raise ValueError(f"need rounds >= 1, iters_per_round >= 1, num_warmup >= 0; got "
                         f"{rounds}, {iters_per_round}, {num_warmup}")
    precisions = [precision] * len(entries) if isinstance(precision, str) else list(precision)
    if len(precisions) != len(entries):
        raise ValueError(f"benchmark_interleaved: {len(precisions)} precisions for {len(entries)} models")
    for prec in precisions:
        _check_precision(prec)
    devices = [_run_device(model, device) for model, _ in entries]
    for (model, _), dev in zip(entries, devices):
        model.to(dev)
    modes = [m.training for m, _ in entries]
    records = [{"times_s": [], "preprocess_s": [], "network_s": [], "postprocess_s": [], "instances": []}
               for _ in entries]
    counters = [0] * len(entries)
    timers = [StageTimer(m, devices[j], clock) for j, (m, _) in enumerate(entries)]
    try:
        for m, _ in entries:
            m.eval()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            for t in timers:
                stack.enter_context(t)
            for j, (m, inputs) in enumerate(entries):
                with _autocast(devices[j], precisions[j]):
                    for i in range(num_warmup):
                        m([inputs[i % len(inputs)]])
                _sync(devices[j])
            for r in range(rounds):
                for j, (m, inputs) in enumerate(entries):
                    with _autocast(devices[j], precisions[j]):
                        for k in range(iters_per_round):
                            x = inputs[counters[j] % len(inputs)]
                            counters[j] += 1
                            st = timers[j].call(x)
                            rec = records[j]
                            rec["times_s"].append(st["total"])
                            for stage in STAGES:
                                rec[f"{stage}_s"].append(st[stage])
                            rec["instances"].append(_num_instances(timers[j].last_output))
                            if on_iteration is not None:
                                on_iteration(j, r, k)
    finally:
        for (m, _), mode in zip(entries, modes):
            m.train(mode)
    out = []
    for rec in records:
        total = sum(rec["times_s"])
        shares = {}
        for stage in STAGES:
            vals = rec[f"{stage}_s"]
            shares[stage] = (sum(vals) / total if total > 0 else None) if all(v is not None for v in vals) else None
        kept = [n for n in rec["instances"] if n is not None]
        out.append({**rec, "num_iter": len(rec["times_s"]), "num_warmup": int(num_warmup), "shares": shares,
                    "mean_instances": sum(kept) / len(kept) if kept else None,
                    **summarize_times(rec["times_s"])})
    return out


def _num_instances(output) -> Optional[int]:
    """Instances in the first result dict of ``model([x])`` (its ``"scores"``), or None."""
    try:
        scores = output[0]["scores"]
    except (TypeError, KeyError, IndexError):
        return None
    return int(len(scores))


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory_mb(fn, device: Union[str, torch.device] = "cpu") -> Optional[float]:
    """Peak memory that one call of ``fn()`` adds, in MiB (2**20 bytes).

    * CUDA: ``torch.cuda.max_memory_allocated`` during the call minus ``memory_allocated`` before
      it (tensor memory of torch's caching allocator).
    * CPU (Linux): the process's peak resident set size during the call minus the resident size
      before it. Before the call, freed heap memory is handed back to the OS
      (glibc ``malloc_trim(0)``) and the kernel's high-water mark is reset (``5`` written to
      ``/proc/self/clear_refs``); after it, the mark (``VmHWM`` of ``/proc/self/status``) is read.
      This counts every page the call makes resident (tensors, workspaces, allocator slack), also
      memory of other threads of the process during the call; it does not count what was resident
      already (weights, inputs).

    Returns:
        MiB, or None where this cannot be measured (another OS, no glibc, ``clear_refs`` not
        writable; the reason is logged at DEBUG).
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError) as e:
        logger.debug("peak_memory_mb: CPU peak RSS not measurable here: %s", e)
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024.0
