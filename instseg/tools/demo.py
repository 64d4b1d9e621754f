"""Run a model on images, a video or the webcam and draw its predictions (masks, boxes, "class score").

    instseg-demo --config-file F --input a.jpg dir/ "imgs/*.png" --output out/ MODEL.WEIGHTS W
    instseg-demo --config-file F --input clip.mp4 --output out.mp4 MODEL.WEIGHTS W
    instseg-demo --config-file F --webcam [--output out/] MODEL.WEIGHTS W
    python tools/demo.py ...      # the same, from a source checkout

``--input`` takes image files, folders (their images, by name) and glob patterns, or one video
file (``.mp4``, ``.avi``, ``.mov``, ``.mkv``). Images are written to the ``--output`` folder as
``<name>.png`` at their own size; a video becomes a video (``mp4v``, same fps and frame count) at
``--output`` when it names a video file, else ``<output>/<name>.mp4``. Without ``--output``
nothing is written (the webcam is shown in a window, which needs an OpenCV build with GUI
support). Instances below ``--confidence-threshold`` (default 0.5) are not drawn. Class names
and colours come from the metadata of DATASETS.TEST[0] (else DATASETS.TRAIN[0]): ``thing_classes``,
``thing_colors``; without them the class id and a fixed palette are used.

The weights (MODEL.WEIGHTS) are loaded strictly as by ``instseg-eval`` (``--allow-partial-weights``
to relax); ``--random-weights`` runs a randomly initialized model (pictures of nothing, for tests).
``--show-internals`` also writes, per image, a PNG grid of what the model does (its
intermediates: SparseInst's IAM, FastInst's IA-guided queries and cross-attention, FASSST's slot
boxes, QueryInst's boxes per stage; docs/deploy.md, "What the model does"): ``<output>/<name>_internals.png``;
for a video the first frame and every ``--internals-period`` N-th (default 30) to
``<output folder>/<video stem>_internals/frame_XXXXXX.png``
(:meth:`instseg.modeling.MetaArchBase.internals`, :func:`instseg.utils.visualize.draw_internals`).
Flags come before the KEY VALUE overrides. Inference: :class:`instseg.engine.Predictor`
(docs/deploy.md); drawing: :func:`instseg.utils.visualize.draw_instances`.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

from instseg.utils.cli import (CONFIG_FILE_REQUIRED, add_allow_partial_weights_argument, add_dataset_argument,
                               split_trailing_opts)

__all__ = ["get_parser", "run", "main", "collect_inputs", "VIDEO_EXTENSIONS", "IMAGE_EXTENSIONS"]


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE", help="path to a config file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", nargs="+", default=None, metavar="PATH",
                     help="image files, folders or glob patterns; or one video file (.mp4/.avi/.mov/.mkv)")
    src.add_argument("--webcam", action="store_true", help="read frames from the webcam (cv2.VideoCapture(0))")
    p.add_argument("--output", default="", metavar="PATH",
                   help="folder for the drawn images; for a video a video file or a folder")
    p.add_argument("--confidence-threshold", type=float, default=0.5,
                   help="lowest score of an instance to draw (default 0.5)")
    p.add_argument("--random-weights", action="store_true",
                   help="run with random initialization instead of MODEL.WEIGHTS (for tests)")
    p.add_argument("--show-internals", action="store_true",
                   help="also write a PNG grid of the model's intermediates per image (<output>/<name>_internals.png; "
                        "for a video every --internals-period frames into <output>/<video>_internals/)")
    p.add_argument("--internals-period", type=int, default=30, metavar="N",
                   help="with --show-internals on a video or the webcam: frame 0 and every N-th frame (default 30)")
    add_allow_partial_weights_argument(p)
    add_dataset_argument(p)
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help="config overrides as KEY VALUE pairs (MODEL.WEIGHTS W ...)")
    return p


def collect_inputs(paths: Sequence[str]) -> List[str]:
    """Image files of ``--input``: files as given, folders' images (extensions
    :data:`IMAGE_EXTENSIONS`, sorted by name), glob patterns' matches (sorted); duplicates dropped.

    Raises:
        FileNotFoundError: a path is neither a file nor a folder and matches nothing (named).
    """
    out: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n)))
        elif os.path.isfile(path):
            found = [path]
        else:
            found = sorted(f for f in glob.glob(path) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"--input: no file, folder or glob match: {path}")
        out.extend(f for f in found if f not in out)
    return out


def _metadata(cfg) -> Tuple[Optional[List[str]], Optional[List[Tuple[int, int, int]]]]:
    """(class names, class colours) of DATASETS.TEST[0] (else TRAIN[0]), ``None`` where unknown."""
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    if not names:
        return None, None
    from instseg.utils.visualize import dataset_classes_and_colors

    return dataset_classes_and_colors(names[0])


def _unique_png(folder: str, file_name: str, used: Dict[str, int]) -> str:
    stem = os.path.splitext(os.path.basename(file_name))[0]
    n = used.get(stem, 0)
    used[stem] = n + 1
    return os.path.join(folder, f"{stem}.png" if n == 0 else f"{stem}_{n}.png")


class _Drawer:
    def __init__(self, predictor, threshold: float):
        self.predictor = predictor
        self.threshold = threshold
        self.class_names, self.colors = _metadata(predictor.cfg)

    def __call__(self, image, format: str = "RGB", internals_path: str = ""):
        """(drawn RGB uint8 image, seconds of prediction) for an RGB/BGR array; with
        ``internals_path`` the prediction comes from the model's ``internals`` (the same
        output) and their grid is written there."""
        import numpy as np

        from instseg.utils.visualize import draw_instances, draw_internals

        rgb = image[:, :, ::-1] if format == "BGR" else image
        t0 = time.perf_counter()
        if internals_path:
            internals = self.predictor.internals(image, format=format, score_threshold=self.threshold)
            out = internals["result"]
        else:
            out = self.predictor(image, format=format)
        dt = time.perf_counter() - t0
        if internals_path:
            draw_internals(np.ascontiguousarray(rgb), internals, internals_path, class_names=self.class_names,
                           colors=self.colors, score_threshold=self.threshold)
        return draw_instances(rgb, out, class_names=self.class_names, colors=self.colors,
                              score_threshold=self.threshold), dt


def _run_images(drawer: _Drawer, files: List[str], output: str, internals: bool = False) -> List[str]:
    import cv2
    from tqdm import tqdm

    from instseg.data import read_image

    if output:
        os.makedirs(output, exist_ok=True)
    written, used = [], {}
    bar = tqdm(files, unit="img", desc="demo")
    for f in bar:
        path = _unique_png(output, f, used) if output else ""
        grid = path[: -len(".png")] + "_internals.png" if internals and path else ""
        drawn, dt = drawer(read_image(f), internals_path=grid)
        if grid:
            written.append(grid)
        bar.set_postfix(fps=f"{1.0 / max(dt, 1e-9):.2f}", refresh=False)
        if output:
            if not cv2.imwrite(path, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
                raise OSError(f"could not write {path}")
            written.append(path)
    return written


def _video_output(output: str, video: str) -> str:
    if output.lower().endswith(VIDEO_EXTENSIONS):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        return output
    os.makedirs(output, exist_ok=True)
    return os.path.join(output, os.path.splitext(os.path.basename(video))[0] + ".mp4")


def _run_stream(drawer: _Drawer, cap, output: str, name: str, show: bool, internals_period: int = 0) -> List[str]:
    """Frames of an opened ``cv2.VideoCapture`` through the model, written to a video at
    ``output`` (same fps and frame count) and/or shown; with ``internals_period`` > 0 the
    internals grid of frame 0 and every ``internals_period``-th frame is written to
    ``<folder of the video>/<name stem>_internals/frame_XXXXXX.png``."""
    import cv2
    from tqdm import tqdm

    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not fps or fps != fps or fps <= 0:
        fps = 30.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    path = _video_output(output, name) if output else ""
    writer = None
    grids: List[str] = []
    grid_dir = ""
    if internals_period > 0 and path:
        grid_dir = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.splitext(os.path.basename(name))[0] + "_internals")
    index = 0
    bar = tqdm(total=total if total > 0 else None, unit="frame", desc="demo")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            grid = os.path.join(grid_dir, f"frame_{index:06d}.png") if grid_dir and index % internals_period == 0 else ""
            drawn, dt = drawer(frame, format="BGR", internals_path=grid)
            if grid:
                grids.append(grid)
            index += 1
            bgr = cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)
            if path:
                if writer is None:
                    h, w = bgr.shape[:2]
                    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h), True)
                    if not writer.isOpened():
                        raise OSError(f"could not open {path} for writing (cv2.VideoWriter, mp4v)")
                writer.write(bgr)
            if show:
                try:
                    cv2.imshow("instseg-demo", bgr)
                    if cv2.waitKey(1) == 27:  # Esc
                        break
                except cv2.error as e:
                    raise RuntimeError("cannot show a window (OpenCV without GUI support, e.g. "
                                       "opencv-python-headless): use --output") from e
            bar.update(1)
            bar.set_postfix(fps=f"{1.0 / max(dt, 1e-9):.2f}", refresh=False)
    finally:
        bar.close()
        cap.release()
        if writer is not None:
            writer.release()
        if show:
            try:
                cv2.destroyAllWindows()
            except cv2.error:
                pass
    return ([path] if writer is not None else []) + grids


def run(argv=None) -> List[str]:
    """Parse ``argv``, predict and draw; returns the files written.

    Raises:
        SystemExit: (status 2, argparse) no ``--config-file``; neither ``--input`` nor
            ``--webcam``; a video with other inputs; no MODEL.WEIGHTS and no ``--random-weights``;
            ``--show-internals`` without ``--output`` or for a model without ``internals()`` (named,
            before the model is built); ``--internals-period`` < 1.
        FileNotFoundError: an input, the weights file or a video that cannot be opened (named).
        instseg.checkpoint.IncompleteWeightsError: the weights do not fill the model.
    """
    p = get_parser()
    args = p.parse_args(argv)
    split_trailing_opts(args, "input")
    if not args.config_file:
        p.error(CONFIG_FILE_REQUIRED)
    if not args.input and not args.webcam:
        p.error("give --input (images, folders, globs or a video) or --webcam")
    videos = [f for f in (args.input or []) if f.lower().endswith(VIDEO_EXTENSIONS)]
    if videos and len(args.input) > 1:
        p.error("--input: a video is processed alone (one video file, no other inputs)")
    if args.show_internals and not args.output:
        p.error("--show-internals writes PNG files: give --output")
    if args.internals_period < 1:
        p.error(f"--internals-period must be >= 1, got {args.internals_period}")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    from instseg.engine.launch import setup_cfg_from_args
    from instseg.engine.predictor import Predictor

    cfg = setup_cfg_from_args(args)
    if not cfg.MODEL.WEIGHTS and not args.random_weights:
        p.error("MODEL.WEIGHTS is required (a checkpoint written by train_net.py or a converted official "
                "one), or --random-weights for a randomly initialized model")
    if args.show_internals:
        from instseg.modeling import META_ARCH_REGISTRY

        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        if not (hasattr(arch, "has_internals") and arch.has_internals()):
            p.error(f"--show-internals: {cfg.MODEL.META_ARCHITECTURE} does not implement internals() "
                    "(docs/deploy.md, 'What the model does')")
    period = args.internals_period if args.show_internals else 0
    predictor = Predictor(cfg, weights="" if args.random_weights else None, allow_random=args.random_weights,
                          allow_partial_weights=args.allow_partial_weights)
    drawer = _Drawer(predictor, args.confidence_threshold)
    import cv2

    if args.webcam:
        cap = cv2.VideoCapture(0)
        if not cap.isOpened():
            raise RuntimeError("--webcam: cv2.VideoCapture(0) could not open a camera")
        written = _run_stream(drawer, cap, os.path.join(args.output, "webcam.mp4") if args.output else "",
                              "webcam", show=not args.output, internals_period=period)
    elif videos:
        if not os.path.isfile(videos[0]):
            raise FileNotFoundError(f"--input: video file not found: {videos[0]}")
        cap = cv2.VideoCapture(videos[0])
        if not cap.isOpened():
            raise FileNotFoundError(f"--input: cannot open video {videos[0]} (cv2.VideoCapture)")
        written = _run_stream(drawer, cap, args.output, videos[0], show=False, internals_period=period)
    else:
        files = collect_inputs(args.input)
        if not files:
            raise FileNotFoundError(f"--input: no image found in {args.input}")
        written = _run_images(drawer, files, args.output, internals=args.show_internals)
    for path in written:
        print(f"wrote {path}")
    if not args.output:
        print("no --output: nothing written")
    return written


def main(argv=None) -> int:
    """Console script ``instseg-demo``: :func:`run`, exit status 0 (an error raises: status 1,
    or 2 for a command-line error)."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
