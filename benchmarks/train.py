"""Training speed and memory of ``clipcli train`` side by side with open_clip_train (issue 26).

    python benchmarks/train.py [--smoke] [--out DIR] [--arch ViT-B-32] [--batches 32,128] [--steps N]

**Data.** WebDataset shards built here (no network): JPEGs of ``--image-size`` px (random square
crops of the sample photos in examples/images, flipped, with sensor-like noise; pure noise when
there are no photos) and ``.txt`` captions of web-like length (mostly 4-20 words, one in ten
30-70, so that most batches hold a caption near the 77-token context); tar members sorted by
key. Every run of both tools reads the same shards.

**Runs.** Every setting (batch x mode: plain, ``--grad-checkpointing``, ``--accum-freq 2``) runs
once per tool, each in its own process, the two tools alternating which goes first. Both get
the same threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``), data workers, architecture (random
initialisation; open_clip is given a model config written from clipcli's preset, so the
shapes are equal: for ViT-B/32 it is open_clip's ``ViT-B-32-quickgelu``), recipe (AdamW 5e-4,
betas 0.9/0.98, eps 1e-6, weight decay 0.2, gradient clipping at 1.0, warmup 1, fp32, the
default RandomResizedCrop of scale 0.9-1), samples per epoch and number of steps. A step is
``batch x accum`` samples on both: open_clip's ``--batch-size`` is per process and ours the global
batch, the same thing in one process. Each tool also writes a checkpoint at the epoch's end.

**Measures.** Samples/s over ``--steps`` timed steps after ``--warmup-steps`` untimed ones, from
each tool's own log: clipcli's ``metrics.jsonl`` (``samples_per_second`` is the average since
the epoch began, so step k ends at ``k x samples_per_step / rate_k`` seconds), open_clip's
``Train Epoch`` lines (each step's ``samples/s``, with ``--log-every-n-steps 1``). Both clocks
count everything between two steps' ends, waiting for data included. Memory, per run: the peak
RSS of the largest single process of the run (``getrusage(RUSAGE_CHILDREN)`` in a fresh small
wrapper process, as benchmarks/run.py measures; a data worker counts when its parent waits for
it) and the peak of the whole process tree's
summed PSS (training process and data workers, sampled every 0.2 s from
``/proc/PID/smaps_rollup``; shared pages counted once in proportion).

Results go to ``DIR/results.json`` (after every run, so an interrupted run keeps what it
measured; each run's logs under ``DIR/runs``) and, as a Markdown table, to stdout. ``--smoke``
runs clipcli's ``tiny`` preset (32 px; open_clip trains the same shapes from a config written
here) on a few 64 px images for 1 + 2 steps: it checks the harness, not speed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import build_labels, environment, load_average, sample_photos  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = {"plain": (), "grad-ckpt": ("--grad-checkpointing",), "accum2": ("--accum-freq", "2")}
TOOLS = ("clipcli", "open_clip")
# The recipe both tools are given (open_clip's own defaults differ: no clipping, warmup 10000).
LR, WD, BETAS, EPS, GRAD_CLIP, WARMUP, SEED = 5e-4, 0.2, (0.9, 0.98), 1e-6, 1.0, 1, 0


# --------------------------------------------------------------------------- data


def captions(count: int, seed: int = 0) -> list[str]:
    """``count`` captions of common words: mostly 4-20 words, one in ten 30-70."""
    rng = random.Random(seed)
    words = sorted({word for label in build_labels(600, seed) for word in label.split()})
    return [" ".join(rng.choice(words) for _ in range(rng.randint(30, 70) if rng.random() < 0.1 else rng.randint(4, 20)))
            for _ in range(count)]


def jpeg_images(count: int, size: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``count`` square JPEGs of ``size`` px: random crops of the sample photos (noise without
    them), resized, mirrored at random, with mild noise so that each file decodes like a photo."""
    import numpy as np
    from PIL import Image

    rng, noise = random.Random(seed), np.random.default_rng(seed)
    try:
        photos = [Image.open(p).convert("RGB") for p in sample_photos()]
    except SystemExit:
        photos = []
    images = []
    for i in range(count):
        if photos:
            photo = photos[i % len(photos)]
            side = min(photo.size) * rng.uniform(0.5, 1.0)
            x0, y0 = rng.uniform(0, photo.width - side), rng.uniform(0, photo.height - side)
            image = photo.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            pixels = np.asarray(image, dtype=np.int16) + noise.normal(0, 3, (size, size, 1)).astype(np.int16)
        else:
            pixels = noise.integers(0, 256, (size, size, 3)).astype(np.int16)
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        images.append(buffer.getvalue())
    return images


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def build_shards(folder: Path, shards: int, per_shard: int, image_size: int, seed: int = 0) -> str:
    """``shards`` WebDataset shards of ``per_shard`` samples each (``KEY.jpg`` + ``KEY.txt``, sorted
    by key) and open_clip's ``sizes.json``; reused when already built alike. Returns the brace
    pattern naming them (``DIR/{00000..00013}.tar``)."""
    pattern = f"{folder}/{{{0:05d}..{shards - 1:05d}}}.tar"
    stamp, spec = folder / ".done", f"{shards} {per_shard} {image_size} {seed}"
    if stamp.exists() and stamp.read_text() == spec:
        return pattern
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    total = shards * per_shard
    texts = captions(total, seed)
    distinct = jpeg_images(min(total, 512), image_size, seed)  # decoding costs the same for a repeated file
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                _add(tar, f"{i:09d}.jpg", distinct[i % len(distinct)])
                _add(tar, f"{i:09d}.txt", texts[i].encode())
    (folder / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": per_shard for s in range(shards)}))
    stamp.write_text(spec)
    return pattern


def caption_tokens(count: int, seed: int = 0) -> dict:
    """Token counts of the first ``count`` captions (end tokens included, cut at 77)."""
    from clipcli.text.bpe import tokenize

    lengths = (tokenize(captions(count, seed), 77, truncate=True) != 0).sum(-1).tolist()
    return {"mean": sum(lengths) / len(lengths), "max": max(lengths),
            "share_over_60": sum(n > 60 for n in lengths) / len(lengths)}


# --------------------------------------------------------------------------- settings and commands


@dataclass(frozen=True)
class Setting:
    batch: int
    mode: str  # a key of MODES

    @property
    def accum(self) -> int:
        return 2 if self.mode == "accum2" else 1

    @property
    def samples_per_step(self) -> int:
        return self.batch * self.accum

    @property
    def label(self) -> str:
        return f"b{self.batch} {self.mode}"


def total_steps(setting: Setting, steps: int, workers: int) -> int:
    """Warmup plus timed steps, rounded up so that open_clip's workers share the batches evenly
    (it rounds the epoch up to a multiple of the workers; both tools then run the same steps)."""
    n = steps
    while (n * setting.accum) % max(1, workers):
        n += 1
    return n


def open_clip_config(preset: dict) -> dict:
    """open_clip's model config for one of clipcli's ViT presets: the same shapes (vision heads
    of width 64 on both) and QuickGELU, as OpenAI's CLIP and clipcli's presets have."""
    if preset.get("vision_patch_size") is None or preset.get("family", "clip") != "clip":
        raise SystemExit("the benchmark compares CLIP ViT presets only (tiny, small, ViT-B/32, ViT-B/16, ViT-L/14)")
    return {"embed_dim": preset["embed_dim"], "quick_gelu": True,
            "vision_cfg": {"image_size": preset["image_resolution"], "layers": preset["vision_layers"],
                           "width": preset["vision_width"], "patch_size": preset["vision_patch_size"]},
            "text_cfg": {"context_length": preset["context_length"], "vocab_size": preset["vocab_size"],
                         "width": preset["transformer_width"], "heads": preset["transformer_heads"],
                         "layers": preset["transformer_layers"]}}


def clipcli_args(setting: Setting, arch: str, data: str, samples: int, workers: int, run: Path) -> list[str]:
    return ["train", "--train-data", data, "--train-num-samples", str(samples), "--arch", arch, "--epochs", "1",
            "--batch-size", str(setting.batch), *MODES[setting.mode], "--workers", str(workers), "--precision", "fp32",
            "--lr", str(LR), "--wd", str(WD), "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS),
            "--grad-clip", str(GRAD_CLIP), "--warmup", str(WARMUP), "--seed", str(SEED), "--log-every", "1",
            "--device", "cpu", "-o", str(run), "--overwrite"]


def open_clip_args(setting: Setting, model: str, data: str, samples: int, workers: int, run: Path) -> list[str]:
    return ["--dataset-type", "webdataset", "--train-data", data, "--train-num-samples", str(samples),
            "--model", model, "--epochs", "1", "--batch-size", str(setting.batch), *MODES[setting.mode],
            "--workers", str(workers), "--precision", "fp32", "--lr", str(LR), "--wd", str(WD),
            "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS), "--grad-clip-norm", str(GRAD_CLIP),
            "--warmup", str(WARMUP), "--seed", str(SEED), "--log-every-n-steps", "1", "--device", "cpu",
            "--logs", str(run.parent), "--name", run.name, "--save-frequency", "0", "--zeroshot-frequency", "0"]


# Both tools start the same way: record torch's thread count, then run the tool's module as
# `python -m` would. open_clip first learns the model config written from clipcli's preset and,
# under webdataset >= 0.2.96 (open_clip_torch[training] pins <= 0.2.86), gets the fix of
# webdataset#384 / open_clip#935: its tar reader asks for no end-of-shard marker, which its
# group_by_keys_nothrow cannot read (KeyError: 'fname'). Nothing else in its pipeline changes.
LAUNCHER = """
import inspect, json, runpy, sys
spec = json.loads(sys.argv[1])
if spec.get("config"):
    import open_clip
    import open_clip_train.data as data
    open_clip.add_model_config(spec["config"])
    if "eof_value" in inspect.signature(data.tar_file_expander).parameters:
        def tarfile_to_samples_nothrow(src, handler=data.log_and_continue):
            files = data.tar_file_expander(data.url_opener(src, handler=handler), handler=handler, eof_value=None)
            return data.group_by_keys_nothrow(files, handler=handler)
        data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
import torch
with open(spec["threads_file"], "w") as f:
    f.write(str(torch.get_num_threads()))
sys.argv = [spec["module"], *spec["args"]]
runpy.run_module(spec["module"], run_name="__main__", alter_sys=True)
"""


# --------------------------------------------------------------------------- reading each tool's log


def clipcli_step_ends(metrics: str, samples_per_step: int) -> list[float]:
    """Seconds from the epoch's start to the end of each step, from ``metrics.jsonl`` text
    (``samples_per_second`` there is the epoch's average so far)."""
    ends = []
    for line in metrics.splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("kind") == "train" and record.get("epoch", 1) == 1:
            if record["step"] != len(ends) + 1:
                raise ValueError(f"metrics.jsonl skips from step {len(ends)} to {record['step']} (--log-every 1?)")
            ends.append(record["step"] * samples_per_step / record["samples_per_second"])
    return ends


OPEN_CLIP_LINE = re.compile(r"Train Epoch: 0 \[\s*(\d+)/\d+ \(\d+%\)\] Data \(t\): [\d.]+ "
                            r"Batch \(t\): [\d.]+, ([\d.eE+-]+)/s")


def open_clip_step_ends(log: str, samples_per_step: int) -> list[float]:
    """The same from open_clip_train's log: each ``Train Epoch`` line gives its step's samples/s
    (the batch-time meter is reset after every logged step)."""
    ends, clock = [], 0.0
    for match in OPEN_CLIP_LINE.finditer(log):
        step = int(match.group(1)) // samples_per_step
        if step != len(ends) + 1:
            raise ValueError(f"open_clip's log skips from step {len(ends)} to {step} (--log-every-n-steps 1?)")
        clock += samples_per_step / float(match.group(2))
        ends.append(clock)
    return ends


def timed_rate(ends: list[float], warmup: int, steps: int, samples_per_step: int) -> dict:
    """Samples/s over steps ``warmup + 1 .. warmup + steps`` and their step times."""
    if len(ends) < warmup + steps:
        raise ValueError(f"{len(ends)} step(s) logged, {warmup + steps} wanted")
    start = ends[warmup - 1] if warmup else 0.0
    times = [b - a for a, b in zip([0.0, *ends], ends)]
    return {"samples_per_second": steps * samples_per_step / (ends[warmup + steps - 1] - start),
            "step_seconds": [round(t, 4) for t in times], "timed_steps": [warmup + 1, warmup + steps]}


# --------------------------------------------------------------------------- one run (a fresh wrapper process)


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def child_main(spec_file: str) -> None:
    """Run one tool's command, sample its process tree's PSS, and write what it measured.
    This process stays small (no torch), so RUSAGE_CHILDREN is the run's own largest process."""
    spec = json.loads(Path(spec_file).read_text())
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    before = load_average()
    start, peak_tree_kb = time.perf_counter(), 0
    with open(spec["log"], "w") as log:
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(spec["launch"])], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, cwd=spec["cwd"])
        while process.poll() is None:
            peak_tree_kb = max(peak_tree_kb, sum(_pss_kb(pid) for pid in _tree(process.pid)))
            time.sleep(0.2)
    result = {"returncode": process.returncode, "process_wall_s": time.perf_counter() - start,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,  # KiB on Linux
              "peak_tree_pss_mb": peak_tree_kb / 1024, "load_average_before": before,
              "load_average_after": load_average()}
    Path(spec["result"]).write_text(json.dumps(result))


def run_one(tool: str, setting: Setting, plan: dict, out: Path) -> dict:
    """One tool at one setting in a fresh wrapper process: its measurement, or why it failed."""
    name = f"{tool}-b{setting.batch}-{setting.mode}"
    run = out / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    steps = total_steps(setting, plan["warmup_steps"] + plan["steps"], plan["workers"])
    samples = steps * setting.samples_per_step
    if tool == "clipcli":
        launch = {"module": "clipcli", "args": clipcli_args(setting, plan["arch"], plan["data"], samples,
                                                              plan["workers"], run / "run")}
    else:
        launch = {"module": "open_clip_train.main", "config": plan["open_clip_config"],
                  "args": open_clip_args(setting, plan["open_clip_model"], plan["data"], samples, plan["workers"],
                                         run / "logs" / "run")}
    launch["threads_file"] = str(run / "threads.txt")
    spec = {"launch": launch, "threads": plan["threads"], "log": str(run / "output.log"), "cwd": str(run),
            "result": str(run / "measured.json")}
    (run / "spec.json").write_text(json.dumps(spec, indent=1))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(run / "spec.json")],
                          capture_output=True, text=True)
    if done.returncode != 0 or not (run / "measured.json").exists():
        return {"failed": f"wrapper exit {done.returncode}: {done.stderr.strip()[-1500:]}"}
    result = json.loads((run / "measured.json").read_text())
    result.update(steps_run=steps, samples_per_epoch=samples, command=launch["args"])
    threads = run / "threads.txt"
    result["torch_threads"] = int(threads.read_text()) if threads.exists() else None
    log = (run / "output.log").read_text(errors="replace")
    try:
        if tool == "clipcli":
            metrics = run / "run" / "metrics.jsonl"
            ends = clipcli_step_ends(metrics.read_text() if metrics.exists() else "", setting.samples_per_step)
        else:
            ends = open_clip_step_ends(log, setting.samples_per_step)
        result.update(timed_rate(ends, plan["warmup_steps"], plan["steps"], setting.samples_per_step))
    except (ValueError, KeyError) as error:
        result["failed"] = f"{error} (exit {result['returncode']}): {log.strip()[-1500:]}"
    if result["returncode"] != 0 and "failed" not in result:
        result["failed"] = f"exit {result['returncode']} after the timed steps: {log.strip()[-1500:]}"
    if not plan["keep_checkpoints"]:  # ViT-B/32 with its optimizer state is 1.8 GB a run
        for path in run.rglob("*"):
            if path.suffix in (".safetensors", ".pt") and path.is_file():
                path.unlink()
    return result


# --------------------------------------------------------------------------- report


def summarize(measurements: dict[str, dict[str, dict]]) -> dict:
    """Per setting: both tools' samples/s, their ratio (clipcli / open_clip) and memory."""
    rows = {}
    for label, by_tool in measurements.items():
        row = {}
        for tool in TOOLS:
            result = by_tool.get(tool)
            if result is None:
                continue
            if "failed" in result:
                row[tool] = {"failed": result["failed"].splitlines()[0][:200]}
                continue
            row[tool] = {k: result[k] for k in ("samples_per_second", "peak_rss_mb", "peak_tree_pss_mb")}
        ok = [row.get(tool, {}).get("samples_per_second") for tool in TOOLS]
        if all(ok):
            row["ratio"] = ok[0] / ok[1]
        rows[label] = row
    return rows


def _cell(row: dict, tool: str, key: str, digits: int) -> str:
    entry = row.get(tool)
    if entry is None:
        return "-"
    if "failed" in entry:
        return "failed"
    return f"{entry[key]:.{digits}f}"


def markdown(report: dict) -> str:
    env, plan = report["environment"], report["plan"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [f"Run {report['started']} ({'smoke' if report['smoke'] else 'full'}): {plan['arch']} random init, fp32, "
             f"{plan['threads']} threads and {plan['workers']} data worker(s) per run, samples/s over steps "
             f"{plan['warmup_steps'] + 1}-{plan['warmup_steps'] + plan['steps']} of each run; {env['cpu']}, "
             f"{env['cpu_count']} cores, flags {' '.join(env['cpu_flags'])}; {versions}", "",
             "| setting | samples/step | clipcli samples/s | open_clip samples/s | clipcli / open_clip "
             "| peak RSS clipcli (MB) | peak RSS open_clip (MB) | tree PSS clipcli (MB) | tree PSS open_clip (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in report["summary"].items():
        setting = Setting(**report["settings"][label])
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
        lines.append(f"| {label} | {setting.samples_per_step} | {_cell(row, 'clipcli', 'samples_per_second', 2)} | "
                     f"{_cell(row, 'open_clip', 'samples_per_second', 2)} | {ratio} | "
                     f"{_cell(row, 'clipcli', 'peak_rss_mb', 0)} | {_cell(row, 'open_clip', 'peak_rss_mb', 0)} | "
                     f"{_cell(row, 'clipcli', 'peak_tree_pss_mb', 0)} | {_cell(row, 'open_clip', 'peak_tree_pss_mb', 0)} |")
    loads = [m.get("load_average_before", ["?"])[0] for by_tool in report["measurements"].values()
             for m in by_tool.values()]
    lines += ["", f"Load average (1 min) before each run: {', '.join(map(str, loads))}."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver


def _missing_packages() -> list[str]:
    import importlib.util

    wanted = {"open_clip_train": "open_clip_torch[training]", "webdataset": "webdataset", "braceexpand": "braceexpand"}
    return [package for module, package in wanted.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1])
        return {}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 64 px images, 1 + 2 steps at batch 8 (checks the harness)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "train", help="work and results folder")
    parser.add_argument("--arch", default=None, help="clipcli preset (ViT only); default ViT-B-32, tiny with --smoke")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes; default 32,128 (8 with --smoke)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, of clipcli, open_clip")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run; default 5 (2 with --smoke)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed first steps; default 2 (1 with --smoke)")
    parser.add_argument("--workers", type=int, default=2, help="data workers of both tools (processes)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of both tools (OMP_NUM_THREADS)")
    parser.add_argument("--image-size", type=int, default=None, help="JPEG side in px; default 224 (64 with --smoke)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint files")
    args = parser.parse_args(argv)
    from clipcli.train.presets import PRESETS, preset_name

    arch = preset_name(args.arch or ("tiny" if args.smoke else "ViT-B-32"))
    if arch not in PRESETS:
        raise SystemExit(f"--arch {args.arch}: not one of clipcli's presets ({', '.join(PRESETS)})")
    tools = [t for t in args.tools.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    if set(tools) - set(TOOLS) or set(modes) - set(MODES) or not tools or not modes:
        raise SystemExit(f"--tools takes {', '.join(TOOLS)}; --modes takes {', '.join(MODES)}")
    missing = _missing_packages() if "open_clip" in tools else []
    if missing:
        raise SystemExit(f"open_clip_train needs {', '.join(missing)}: pip install {' '.join(missing)} "
                         "(or run with --tools clipcli)")
    batches = [int(b) for b in (args.batches or ("8" if args.smoke else "32,128")).split(",")]
    steps = args.steps or (2 if args.smoke else 5)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.smoke else 2)
    image_size = args.image_size or (64 if args.smoke else 224)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    settings = [Setting(b, m) for b in batches for m in modes]
    workers = max(1, args.workers)
    needed = max(total_steps(s, warmup + steps, args.workers) * s.samples_per_step for s in settings)
    per_shard = 16 if args.smoke else 128
    shards = -(-needed // (per_shard * workers)) * workers  # every worker the same number of full shards
    print(f"building {shards} shards of {per_shard} samples ...", file=sys.stderr)
    data = build_shards(out / "shards", shards, per_shard, image_size)
    config_dir = out / "open_clip_config"
    config_dir.mkdir(exist_ok=True)
    model = f"clipcli-bench-{arch.replace('/', '-')}"
    (config_dir / f"{model}.json").write_text(json.dumps(open_clip_config(PRESETS[arch]), indent=1))
    plan = {"arch": arch, "open_clip_model": model, "open_clip_config": str(config_dir / f"{model}.json"),
            "data": data, "steps": steps, "warmup_steps": warmup, "workers": args.workers, "threads": args.threads,
            "keep_checkpoints": args.keep_checkpoints}
    import importlib.metadata as md

    environ = environment()
    for dist in ("webdataset",):
        try:
            environ["versions"][dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    report = {"smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "environment": environ, "plan": plan,
              "data": {"shards": shards, "samples_per_shard": per_shard, "image_size": image_size,
                       "caption_tokens": caption_tokens(min(needed, 2000))},
              "settings": {s.label: asdict(s) for s in settings}, "measurements": {}, "summary": {}}
    for i, setting in enumerate(settings):
        order = tools if i % 2 == 0 else tools[::-1]
        by_tool = report["measurements"].setdefault(setting.label, {})
        for tool in order:
            print(f"  {tool} {setting.label} ...", file=sys.stderr)
            by_tool[tool] = run_one(tool, setting, plan, out)
            result = by_tool[tool]
            failure = result.get("failed", "").strip().splitlines()
            print(f"    failed: {failure[-1] if failure else '?'} (see {out / 'runs'})" if "failed" in result
                  else f"    {result['samples_per_second']:.2f} samples/s", file=sys.stderr)
            report["summary"] = summarize(report["measurements"])
            (out / "results.json").write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
