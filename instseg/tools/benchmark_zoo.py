"""Time a zoo of configs side by side in one process, and plot speed against mask AP.

Every model is timed under identical settings: batch 1, warm-up, synchronized timing of the
whole ``model([image])`` call (pre-processing, network, post-processing; the test mapper's
inputs, decoded and resized before timing), the same images, the same threads. The models are
interleaved round by round (round r: model 1 for --iters-per-round calls, then model 2, ...), so
that load from other jobs on the machine hits all of them alike. Each call is split into
pre-processing (``preprocess_images``), post-processing (``inference``: selection, top-k, masks
to the original size) and the network (the rest), see :class:`instseg.evaluation.timing.StageTimer`.

Examples::

    instseg-benchmark-zoo                                      # the four default configs
    instseg-benchmark-zoo --paper-rows --images ../shared/data/coco128-seg/images
    instseg-benchmark-zoo --config-files configs/sparseinst/R50_giam.yaml configs/fassst/MNv2_416.yaml \\
        --metrics output/sparseinst/R50_giam/metrics.json - --rounds 10
    instseg-benchmark-zoo --scaling --sizes 416 640 1024 --detections 10 100
    python tools/benchmark_zoo.py ...                           # the same, from a source checkout

Writes to --output (default ``output/benchmark_zoo``): ``zoo.md`` (Markdown table), ``zoo.csv``,
``zoo.json`` (everything, per-call times included) and ``speed_accuracy.png`` (x: median ms on
this machine, log scale; y: COCO mask AP, from each config's ``--metrics`` file when given, else
the published AP of ``configs/zoo_published.json``, marked "published"; plus the published points
of other real-time models, each series labelled with the hardware it was measured on). With
``--scaling``: ``scaling.csv`` and ``scaling.png``, each model at several test short sides
(INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST scaled with it) and several TEST.DETECTIONS_PER_IMAGE, with
median ms and peak memory (:func:`instseg.evaluation.timing.peak_memory_mb`: on the CPU the peak
resident memory that one call adds, Linux only).

Without MODEL.WEIGHTS a model is randomly initialized (logged; speed does not depend on the
weights, except through how many instances pass the score thresholds: the table's "instances"
column and ``scaling.csv`` give the mean number of instances returned per image). Flags come before the KEY VALUE overrides, which apply to
every config; after a list flag (--config-files, --metrics, --sizes, --detections) put another
flag or ``--`` before them.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("instseg.benchmark_zoo")

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PUBLISHED_FILE = "zoo_published.json"
DEFAULT_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco128-seg" / "images"
SIZES = (416, 512, 640, 800, 1024)
DETECTIONS = (10, 50, 100)
TABLE_COLUMNS = ("model", "config", "input", "params_m", "gflops", "ms_median", "ms_p90", "ms_mean", "fps",
                 "pre_share", "net_share", "post_share", "mean_instances", "mask_ap", "ap_source", "weights")
#: ``--variants``: (autocast precision, channels_last memory format) of each. "fp32" is the model as
#: built; the others are copies with the same weights.
VARIANTS = {"fp32": ("fp32", False), "channels_last": ("fp32", True), "bf16": ("bf16", False),
            "bf16_channels_last": ("bf16", True)}
SCALING_COLUMNS = ("model", "config", "sweep", "short_side", "max_size", "detections", "input",
                   "ms_median", "ms_p90", "peak_mem_mib", "mean_instances")


# ----------------------------------------------------------------------------- the data file
def default_published_file() -> str:
    """``configs/zoo_published.json`` of the working directory when present, else the repository's."""
    local = Path("configs") / PUBLISHED_FILE
    return str(local if local.is_file() else REPO_CONFIGS / PUBLISHED_FILE)


def load_published(path: str) -> Dict:
    """The zoo data file (``configs/zoo_published.json``): ``{"configs": [{"config": path
    relative to configs/, "name", "mask_ap", "split", "source", "default"?, "paper_row"?}, ...],
    "reference_series": [{"series", "source", "points": [{"name", "mask_ap", "ms"}]}]}``.

    Raises:
        FileNotFoundError: no such file. ValueError: an entry without ``config`` / ``mask_ap``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--published: file not found: {path}")
    with open(path) as f:
        data = json.load(f)
    for e in data.get("configs", []):
        if "config" not in e or not isinstance(e.get("mask_ap"), (int, float)):
            raise ValueError(f"{path}: every configs entry needs 'config' and a numeric 'mask_ap': {e}")
    data.setdefault("configs", [])
    data.setdefault("reference_series", [])
    return data


def published_entry(data: Dict, config_file: str) -> Optional[Dict]:
    """The data-file entry of ``config_file`` (matched on its path ending, e.g.
    ``.../configs/fassst/MNv2_416.yaml`` matches ``fassst/MNv2_416.yaml``), or None."""
    p = Path(os.path.abspath(config_file)).as_posix()
    for e in data["configs"]:
        key = e["config"].lstrip("./")
        if p == key or p.endswith("/" + key):
            return e
    return None


def select_configs(data: Dict, which: str, root: Path) -> List[str]:
    """Config files of the entries flagged ``which`` (``"default"`` or ``"paper_row"``), under
    ``root`` (the folder the data file is in). A flagged file that does not exist is skipped with a warning."""
    files = []
    for e in data["configs"]:
        if e.get(which):
            f = root / e["config"]
            if f.is_file():
                files.append(str(f))
            else:
                logger.warning("%s: %s is flagged %s but does not exist; skipped", root / PUBLISHED_FILE, f, which)
    return files


def mask_ap_from_metrics(path: str) -> float:
    """COCO mask AP of a ``metrics.json`` (eval_net / training: keyed by dataset, or the flat
    ``{"segm": {"AP": ...}}`` form); with several datasets the first one (logged).

    Raises:
        FileNotFoundError: no file. KeyError: no ``segm`` AP in it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--metrics: file not found: {path}")
    with open(path) as f:
        data = json.load(f)
    if isinstance(data.get("segm"), dict) and "AP" in data["segm"]:
        return float(data["segm"]["AP"])
    found = [(k, v["segm"]["AP"]) for k, v in data.items()
             if isinstance(v, dict) and isinstance(v.get("segm"), dict) and "AP" in v["segm"]]
    if not found:
        raise KeyError(f"{path}: no segm AP (expected {{dataset: {{'segm': {{'AP': ...}}}}}})")
    if len(found) > 1:
        logger.info("%s: %d datasets, using the first: %s", path, len(found), found[0][0])
    return float(found[0][1])


# ----------------------------------------------------------------------------- CLI
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--config-files", nargs="+", default=None, metavar="FILE",
                       help="configs to time (default: the entries of --published with \"default\": true)")
    which.add_argument("--paper-rows", action="store_true",
                       help="the main paper-table rows of --published (\"paper_row\": true) whose configs exist")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--images", default=None, metavar="DIR",
                     help=f"folder of real images (first --num-images by name); default: {DEFAULT_IMAGES} "
                     "when present, else synthetic images")
    src.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                     help="synthetic random images of this original size (the test resize still applies)")
    parser.add_argument("--num-images", type=int, default=10, help="images per model (default 10)")
    parser.add_argument("--num-warmup", type=int, default=2, help="untimed calls per model (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--iters-per-round", type=int, default=2,
                        help="timed calls per model per round (default 2: 10 timed calls per model)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="JSON",
                        help="one metrics.json per config, in the same order ('-' for none): its COCO "
                        "mask AP replaces the published one")
    parser.add_argument("--published", default=None, metavar="JSON",
                        help="the zoo data file (default: configs/zoo_published.json)")
    parser.add_argument("--variants", nargs="+", default=["fp32"], choices=list(VARIANTS), metavar="V",
                        help="time each config in these variants, side by side in the same interleaved run "
                        f"(one row each; choices {', '.join(VARIANTS)}; default fp32): a before/after "
                        "comparison of memory format and autocast under the same machine noise")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--scaling", action="store_true",
                        help="also time each model at --sizes and --detections: scaling.csv, scaling.png")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                        help=f"test short sides of --scaling (default {' '.join(map(str, SIZES))})")
    parser.add_argument("--detections", type=int, nargs="+", default=list(DETECTIONS),
                        help=f"TEST.DETECTIONS_PER_IMAGE values of --scaling (default {' '.join(map(str, DETECTIONS))})")
    parser.add_argument("--output", default="output/benchmark_zoo", metavar="DIR",
                        help="output folder (default output/benchmark_zoo)")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides (KEY VALUE pairs) applied to every config")
    return parser


def environment() -> Dict:
    """What the numbers were measured with: device description, dtype, threads, torch version, date."""
    import platform

    import torch

    from instseg.evaluation.timing import _cpu_name

    return {"cpu": _cpu_name(), "logical_cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "dtype": "float32",
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.date.today().isoformat()}


def _cfg_for(config_file: str, opts: Sequence[str]):
    from instseg.tools.benchmark_fps import setup_benchmark_cfg

    args = argparse.Namespace(config_file=config_file, opts=list(opts), dataset=None, cityscapes=None)
    return setup_benchmark_cfg(args)


def _build(cfg, state_dict=None):
    """The config's model in eval mode. Its random initialization is seeded (``SEED``, else 0):
    with random weights the number of instances that pass the score thresholds, and so the
    post-processing time, depends on the draw (SparseInst R-50 kept 100 in one unseeded run and
    3 in another), so a rerun must draw the same weights."""
    import torch

    from instseg.modeling import build_model

    torch.manual_seed(int(cfg.SEED) if int(cfg.SEED) >= 0 else 0)
    model = build_model(cfg)
    weights = cfg.MODEL.WEIGHTS
    if state_dict is not None:
        model.load_state_dict(state_dict)
    elif weights:
        from instseg.checkpoint import load_checkpoint

        load_checkpoint(model, weights)
    model.eval()
    return model


def _short_name(config_file: str, entry: Optional[Dict]) -> str:
    if entry and entry.get("name"):
        return entry["name"]
    p = Path(config_file)
    return f"{p.parent.name}/{p.stem}"


def _relative_config(config_file: str, data_root: Path) -> str:
    """The config's path relative to the folder of the data file, else to the repository's
    configs/, else as given."""
    p = Path(os.path.abspath(config_file))
    for base in (data_root, REPO_CONFIGS):
        try:
            return p.relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return config_file


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


# ----------------------------------------------------------------------------- outputs
def write_table(rows: List[Dict], env: Dict, out_dir: str, note: str) -> Tuple[str, str]:
    """``zoo.csv`` (TABLE_COLUMNS, numbers unrounded) and ``zoo.md`` (rounded, with the
    environment). Returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, md_path = os.path.join(out_dir, "zoo.csv"), os.path.join(out_dir, "zoo.md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in TABLE_COLUMNS})
    with open(md_path, "w") as f:
        f.write(format_markdown(rows, env, note) + "\n")
    return csv_path, md_path


def format_markdown(rows: List[Dict], env: Dict, note: str = "") -> str:
    """The Markdown table of the zoo (what ``zoo.md`` holds and the tool prints)."""
    head = ("| model | config | input (H x W) | params (M) | GFLOPs | median ms | p90 ms | FPS "
            "| pre / net / post (%) | instances | mask AP | AP source |")
    lines = [head, "| " + " | ".join(["---"] * 12) + " |"]
    for r in rows:
        shares = " / ".join(_fmt(None if r[k] is None else 100 * r[k], ".0f")
                            for k in ("pre_share", "net_share", "post_share"))
        lines.append(
            f"| {r['model']} | `{r['config']}` | {r['input']} | {_fmt(r['params_m'], '.1f')} | "
            f"{_fmt(r['gflops'], '.1f')} | {_fmt(r['ms_median'], '.0f')} | {_fmt(r['ms_p90'], '.0f')} | "
            f"{_fmt(r['fps'], '.2f')} | {shares} | {_fmt(r.get('mean_instances'), '.0f')} | "
            f"{_fmt(r['mask_ap'], '.1f')} | {r['ap_source']} |")
    device = env.get("cuda") or f"{env['cpu']} ({env['threads']} threads, {env['logical_cores']} logical cores)"
    lines += ["", f"{device}, {env['dtype']}, torch {env['torch']}, {env['date']}. {note}".rstrip()]
    return "\n".join(lines)


def plot_speed_accuracy(rows: List[Dict], reference: List[Dict], path: str, env: Dict) -> str:
    """``speed_accuracy.png``: median ms (log x) against mask AP. Ours: filled circles where the AP
    was measured (``--metrics``), open circles where it is the published AP; the reference series
    in their own markers, labelled with their hardware."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 6.4), dpi=100)
    device = env.get("cuda") or f"{env['cpu']}, {env['threads']} threads"
    for measured in (True, False):
        pts = [r for r in rows if r["mask_ap"] is not None and r["ap_measured"] == measured]
        if not pts:
            continue
        label = (f"this repo, ms on this machine ({device}); AP " +
                 ("measured (metrics.json)" if measured else "published"))
        ax.scatter([r["ms_median"] for r in pts], [r["mask_ap"] for r in pts], s=60, zorder=3,
                   facecolors="tab:red" if measured else "none", edgecolors="tab:red", linewidths=1.5, label=label)
        for r in pts:
            inst = r.get("mean_instances")
            text = r["model"] + (f" ({inst:.0f} inst./image)" if inst is not None else "")
            ax.annotate(text, (r["ms_median"], r["mask_ap"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7).set_in_layout(False)
    markers = ["s", "^", "D", "v", "P", "X"]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:gray"]
    for i, series in enumerate(reference):
        pts = series.get("points", [])
        if not pts:
            continue
        ax.scatter([p["ms"] for p in pts], [p["mask_ap"] for p in pts], marker=markers[i % len(markers)],
                   color=colors[i % len(colors)], s=45, zorder=3, label=series["series"])
        for p in pts:
            ax.annotate(p["name"], (p["ms"], p["mask_ap"]), textcoords="offset points", xytext=(5, -9),
                        fontsize=7).set_in_layout(False)
    ax.set_xscale("log")
    xs = [r["ms_median"] for r in rows if r["mask_ap"] is not None] + [
        p["ms"] for series in reference for p in series.get("points", [])]
    if xs:
        ax.set_xlim(min(xs) / 1.5, max(xs) * 10)  # room for the labels right of the points
    ax.set_xlabel("ms per image, log scale (this repo: batch 1, pre- + post-processing included; "
                  "published: as each source measures it)", fontsize=9)
    ax.set_ylabel("COCO mask AP")
    ax.set_title("speed vs accuracy (different series were timed on different hardware)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_scaling(rows: List[Dict], path: str, env: Dict) -> str:
    """``scaling.png``: median ms and peak memory against the test short side and against
    TEST.DETECTIONS_PER_IMAGE, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=100)
    for col, (sweep, key, xlabel) in enumerate((("short_side", "short_side", "test short side (px)"),
                                                 ("detections", "detections", "TEST.DETECTIONS_PER_IMAGE"))):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r for r in rows if r["sweep"] == sweep and r["model"] == model), key=lambda r: r[key])
            if not pts:
                continue
            xs = [r[key] for r in pts]
            axes[0, col].plot(xs, [r["ms_median"] for r in pts], marker="o", label=model)
            mem = [(x, r["peak_mem_mib"]) for x, r in zip(xs, pts) if r["peak_mem_mib"] is not None]
            if mem:
                axes[1, col].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=model)
        axes[0, col].set_ylabel("median ms per image")
        axes[1, col].set_ylabel("peak memory added by one call (MiB)")
        for row in range(2):
            axes[row, col].set_xlabel(xlabel)
            axes[row, col].grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    device = env.get("cuda") or f"{env['cpu']}, {env['threads']} threads"
    fig.suptitle(f"scaling on {device}, torch {env['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the run
def _prepare(config_file: str, opts, images, input_size, num_images, flops: bool) -> Dict:
    """Config, inputs, model, params and FLOPs of one config."""
    import torch

    from instseg.evaluation.timing import build_test_inputs, count_flops, count_parameters

    cfg, note = _cfg_for(config_file, opts)
    if note:
        print(f"{config_file}: {note}")
    cfg.freeze()
    inputs, desc = build_test_inputs(cfg, images=images, input_size=input_size, num_images=num_images)
    torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    model = _build(cfg)
    if cfg.MODEL.DEVICE:
        model.to(cfg.MODEL.DEVICE)
    if not cfg.MODEL.WEIGHTS:
        logger.info("%s: no MODEL.WEIGHTS, random initialization (speed only)", config_file)
    gflops, flops_error = None, "skipped" if not flops else None
    if flops:
        try:
            gflops = count_flops(model, inputs[:1])
        except Exception as e:  # tracing can fail; timing stays valid
            logger.warning("%s: FLOP count failed: %s", config_file, e)
            flops_error = f"{type(e).__name__}: {e}"
    return {"config_file": config_file, "cfg": cfg, "inputs": inputs, "images": desc, "model": model,
            "params": count_parameters(model), "gflops": gflops, "flops_error": flops_error,
            "num_classes_note": note}


def _input_str(inputs) -> str:
    from instseg.evaluation.timing import _input_size

    (h, w), note = _input_size(inputs)
    return f"{h} x {w}" + (" (mean)" if note else "")


def run_scaling(prepared: List[Dict], args, opts, images, input_size, env, out_dir) -> List[Dict]:
    """The --scaling sweeps; writes scaling.csv and scaling.png, returns the rows."""
    import torch

    from instseg.evaluation.timing import _model_device, benchmark_interleaved, build_test_inputs, peak_memory_mb

    settings = [("short_side", s, None) for s in args.sizes] + [("detections", None, d) for d in args.detections]
    rows = []
    for sweep, size, dets in settings:
        entries, metas = [], []
        for p in prepared:
            base = p["cfg"]
            extra = []
            if size is not None:
                ratio = base.INPUT.MAX_SIZE_TEST / max(base.INPUT.MIN_SIZE_TEST, 1)
                extra += ["INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(int(round(size * ratio)))]
            if dets is not None:
                extra += ["TEST.DETECTIONS_PER_IMAGE", str(dets)]
            cfg, _ = _cfg_for(p["config_file"], list(opts) + extra)
            cfg.freeze()
            inputs = (build_test_inputs(cfg, images=images, input_size=input_size, num_images=args.num_images)[0]
                      if size is not None else p["inputs"])
            model = (_build(cfg, p["model"].state_dict()).to(_model_device(p["model"]))
                     if dets is not None else p["model"])
            entries.append((model, inputs))
            metas.append((p, cfg, inputs, model))
        print(f"scaling: {sweep} = {size if size is not None else dets}")
        results = benchmark_interleaved(entries, num_warmup=args.num_warmup, rounds=args.rounds,
                                        iters_per_round=args.iters_per_round)
        for (p, cfg, inputs, model), res in zip(metas, results):
            with torch.no_grad():
                mem = peak_memory_mb(lambda: model([inputs[0]]), _model_device(model))
            rows.append({"model": p["row_name"], "config": p["config_rel"], "sweep": sweep,
                         "short_side": int(cfg.INPUT.MIN_SIZE_TEST), "max_size": int(cfg.INPUT.MAX_SIZE_TEST),
                         "detections": int(cfg.TEST.DETECTIONS_PER_IMAGE), "input": _input_str(inputs),
                         "ms_median": res["ms_median"], "ms_p90": res["ms_p90"], "peak_mem_mib": mem,
                         "mean_instances": res["mean_instances"]})
            print(f"  {p['row_name']:32s} {rows[-1]['input']:>16s}  det {rows[-1]['detections']:4d}  "
                  f"median {res['ms_median']:9.1f} ms  peak +{_fmt(mem, '.0f')} MiB  "
                  f"instances {_fmt(rows[-1]['mean_instances'], '.1f')}")
    with open(os.path.join(out_dir, "scaling.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SCALING_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SCALING_COLUMNS})
    plot_scaling(rows, os.path.join(out_dir, "scaling.png"), env)
    return rows


def run(argv=None, on_iteration=None) -> Dict:
    """Parse ``argv``, time the zoo, print the table and write the outputs (module docstring).

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
        on_iteration: passed to :func:`instseg.evaluation.timing.benchmark_interleaved` (the
            interleaving schedule: ``(model_index, round, iteration)`` per timed call).

    Returns:
        ``{"environment", "rows" (one dict per config, TABLE_COLUMNS plus "ap_measured",
        "shares", "times_ms"), "scaling" (rows or None), "outputs": {name: path}}``.

    Raises:
        SystemExit: bad flags (argparse), e.g. ``--metrics`` not aligned with the configs.
        FileNotFoundError: a config, image folder, data file or metrics file that does not exist.
    """
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.num_warmup < 0 or args.rounds < 1 or args.iters_per_round < 1:
        parser.error("need --num-images >= 1, --num-warmup >= 0, --rounds >= 1, --iters-per-round >= 1")
    if args.scaling and (not args.sizes or min(args.sizes) < 1 or not args.detections or min(args.detections) < 1):
        parser.error("--sizes and --detections need positive values")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    import torch

    from instseg.evaluation.timing import benchmark_interleaved

    if args.threads:
        torch.set_num_threads(args.threads)
    published_path = args.published or default_published_file()
    data = load_published(published_path)
    root = Path(published_path).resolve().parent
    if args.config_files:
        configs = list(args.config_files)
    else:
        configs = select_configs(data, "paper_row" if args.paper_rows else "default", root)
        if not configs:
            parser.error(f"no configs: {published_path} flags none that exists")
    for c in configs:
        if not os.path.isfile(c):
            parser.error(f"config file not found: {c}")
    if args.metrics is not None and len(args.metrics) != len(configs):
        parser.error(f"--metrics: {len(args.metrics)} files for {len(configs)} configs (use '-' for none)")
    images, input_size = args.images, args.input_size
    if images is None and input_size is None and DEFAULT_IMAGES.is_dir():
        images = str(DEFAULT_IMAGES)
    if images is not None and not os.path.isdir(images):
        parser.error(f"--images: not a folder: {images}")
    opts = list(args.opts or [])
    if opts[:1] == ["--"]:  # "--sizes 416 640 -- KEY VALUE": the separator after a list flag
        opts = opts[1:]

    env = environment()
    print(f"device: {env['cuda'] or env['cpu']} ({env['logical_cores']} logical cores), dtype {env['dtype']}, "
          f"torch threads {env['threads']}, torch {env['torch']}, python {env['python']}, {env['date']}")
    print(f"inputs: {'real images from ' + images if images else 'synthetic random images'}; "
          f"{args.num_warmup} warm-up calls per model, {args.rounds} rounds x {args.iters_per_round} "
          f"timed calls per model, interleaved")

    prepared = []
    for i, c in enumerate(configs):
        p = _prepare(c, opts, images, input_size, args.num_images, not args.no_flops)
        entry = published_entry(data, c)
        p["row_name"] = _short_name(c, entry)
        p["config_rel"] = _relative_config(c, root)
        metrics = args.metrics[i] if args.metrics else "-"
        if metrics != "-":
            p["mask_ap"], p["ap_measured"] = mask_ap_from_metrics(metrics), True
            p["ap_source"] = f"measured ({metrics})"
        elif entry is not None:
            p["mask_ap"], p["ap_measured"] = float(entry["mask_ap"]), False
            p["ap_source"] = f"published ({entry.get('split', 'COCO')}; {PUBLISHED_FILE})"
        else:
            p["mask_ap"], p["ap_measured"], p["ap_source"] = None, False, "none"
        prepared.append(p)
        print(f"[{i + 1}/{len(configs)}] {p['row_name']} ({c}): {p['images']}, input {_input_str(p['inputs'])}, "
              f"weights {p['cfg'].MODEL.WEIGHTS or '(random initialization)'}")

    import copy

    entries, precisions, row_of = [], [], []
    for p in prepared:
        for v in args.variants:
            prec, channels_last = VARIANTS[v]
            model = p["model"]
            if v != args.variants[0] or channels_last:
                model = copy.deepcopy(p["model"])
            if channels_last:
                model.to(memory_format=torch.channels_last)
            entries.append((model, p["inputs"]))
            precisions.append(prec)
            row_of.append((p, v))
    results = benchmark_interleaved(entries, num_warmup=args.num_warmup, rounds=args.rounds,
                                    iters_per_round=args.iters_per_round, precision=precisions,
                                    on_iteration=on_iteration)
    rows = []
    for (p, variant), res in zip(row_of, results):
        sh = res["shares"]
        rows.append({
            "model": p["row_name"] + ("" if args.variants == ["fp32"] else f" [{variant}]"), "variant": variant, "config": p["config_rel"], "input": _input_str(p["inputs"]),
            "params_m": p["params"] / 1e6, "gflops": p["gflops"], "ms_median": res["ms_median"],
            "ms_p90": res["ms_p90"], "ms_mean": res["ms_mean"], "fps": res["fps"],
            "pre_share": sh["preprocess"], "net_share": sh["network"], "post_share": sh["postprocess"],
            "mean_instances": res["mean_instances"], "mask_ap": p["mask_ap"], "ap_source": p["ap_source"], "ap_measured": p["ap_measured"],
            "weights": p["cfg"].MODEL.WEIGHTS or "random", "images": p["images"],
            "flops_error": p["flops_error"], "num_iter": res["num_iter"],
            "times_ms": [1000 * t for t in res["times_s"]],
        })
    out_dir = args.output
    os.makedirs(out_dir, exist_ok=True)
    note = (f"Batch 1, {args.num_warmup} warm-up + {args.rounds} x {args.iters_per_round} timed calls per model, "
            "interleaved round by round; pre-processing + network + post-processing timed, image decoding "
            "and resizing excluded; GFLOPs: fvcore, 1 multiply-add = 1 FLOP, network only. "
            + ("Random weights where no MODEL.WEIGHTS." if any(r["weights"] == "random" for r in rows) else ""))
    csv_path, md_path = write_table(rows, env, out_dir, note)
    png = plot_speed_accuracy(rows, data["reference_series"], os.path.join(out_dir, "speed_accuracy.png"), env)
    print(format_markdown(rows, env, note))
    outputs = {"zoo.md": md_path, "zoo.csv": csv_path, "speed_accuracy.png": png}
    scaling = None
    if args.scaling:
        scaling = run_scaling(prepared, args, opts, images, input_size, env, out_dir)
        outputs["scaling.csv"] = os.path.join(out_dir, "scaling.csv")
        outputs["scaling.png"] = os.path.join(out_dir, "scaling.png")
    report = {"environment": env, "published_file": published_path, "rows": rows, "scaling": scaling,
              "outputs": outputs}
    json_path = os.path.join(out_dir, "zoo.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    outputs["zoo.json"] = json_path
    print("written: " + ", ".join(outputs.values()))
    return report


def main(argv=None) -> int:
    """Console script ``instseg-benchmark-zoo``: :func:`run`, exit status 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
