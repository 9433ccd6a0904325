"""Side-by-side benchmark of clipcli against OpenAI's reference ``clip`` package.

    python benchmarks/run.py [--smoke] [--out DIR] [--rounds N] [--only TASK,...]

Everything is built locally (no network): a web-size and a camera-size JPEG set made from the
sample photos, a random-weight ViT-B/32 checkpoint in OpenAI's released TorchScript format, and
1,000 labels x 7 templates of short prompts. Each measurement runs in its own Python process, so
its peak RSS (``resource.getrusage``) is its own; reference and clipcli runs alternate, round by
round, and the best round counts (the machine is shared: the load average is recorded with every
measurement). Results go to ``DIR/results.json`` and, as a Markdown table, to stdout.

``--smoke`` uses the tiny test architecture, a few small images and short time budgets: it
checks that the harness works, not how fast anything is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = [ROOT / "examples" / "images", ROOT / "tests" / "data"]

# name -> (count, width, height, JPEG quality); smoke sizes keep the harness check fast
FULL_SETS = {"web": (100, 640, 480, 85), "camera": (24, 4000, 3000, 90)}
SMOKE_SETS = {"web": (6, 160, 120, 85), "camera": (2, 800, 600, 90)}


# --------------------------------------------------------------------------- data


def sample_photos() -> list[Path]:
    for folder in SAMPLES:
        photos = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if photos:
            return photos
    raise SystemExit("no sample photos in examples/images or tests/data")


def build_image_set(folder: Path, count: int, width: int, height: int, quality: int, seed: int) -> list[Path]:
    """``count`` JPEGs near ``width`` x ``height``: random crops of the sample photos, resized,
    with mild sensor-like noise so the files have realistic entropy (and decode cost)."""
    import numpy as np
    from PIL import Image

    done = folder / ".done"
    if done.exists() and done.read_text() == f"{count} {width} {height} {quality} {seed}":
        return sorted(folder.glob("*.jpg"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sample_photos()]
    for i in range(count):
        photo = photos[i % len(photos)]
        w = round(width * rng.uniform(0.92, 1.08)) if count > 30 else width
        h = round(height * rng.uniform(0.92, 1.08)) if count > 30 else height
        aspect = w / h
        cw = min(photo.width, round(photo.height * aspect)) * rng.uniform(0.75, 1.0)
        ch = cw / aspect
        x0, y0 = rng.uniform(0, photo.width - cw), rng.uniform(0, photo.height - ch)
        image = photo.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.int16) + noise.normal(0, 3, (h, w, 1)).astype(np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=quality)
    done.write_text(f"{count} {width} {height} {quality} {seed}")
    return sorted(folder.glob("*.jpg"))


def build_checkpoint(path: Path, architecture: str) -> Path:
    if path.exists():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import random_reference_model, save_released

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    save_released(random_reference_model(architecture, seed=0), temp)
    os.replace(temp, path)
    return path


def build_labels(count: int, seed: int = 0) -> list[str]:
    """``count`` labels: one or two common words from the BPE vocabulary."""
    import gzip

    with gzip.open(ROOT / "clipcli" / "data" / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:20000]
    words = sorted({a + b[:-4] for a, b in (line.split(" ") for line in lines if " " in line)
                    if b.endswith("</w>") and (a + b[:-4]).isalpha() and len(a + b[:-4]) >= 4})
    rng = random.Random(seed)
    return [" ".join(rng.sample(words, rng.choice((1, 1, 2)))) for _ in range(count)]


def build_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` labels x the 7 templates of ``templates_imagenet7.txt``."""
    path = ROOT / "clipcli" / "data" / "templates_imagenet7.txt"
    templates = [t for t in path.read_text().splitlines() if t and not t.startswith("#")]
    return [t.format(label) for label in build_labels(count, seed) for t in templates]


# --------------------------------------------------------------------------- one measurement (child process)


def _peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def _load_reference(checkpoint: str, dtype: str):
    import warnings


    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip

    model, preprocess = clip.load(checkpoint, device="cpu", jit=False)
    return clip, model.eval(), preprocess


def _load_clipcli(checkpoint: str, dtype: str):
    import torch

    import clipcli

    return clipcli.load(checkpoint, device="cpu", dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)


def _timed_batches(run, inputs, batch: int, budget: float, minimum: int) -> tuple[float, int, list]:
    """Run ``run`` over ``inputs`` in batches until the budget is spent (at least ``minimum``
    items): (seconds, items, outputs)."""
    outputs, done, start = [], 0, time.perf_counter()
    while done < len(inputs):
        outputs.append(run(inputs[done : done + batch]))
        done += len(outputs[-1])
        if done >= minimum and time.perf_counter() - start > budget:
            break
    return time.perf_counter() - start, done, outputs


MODEL_IMPLS = ("reference", "clipcli", "open_clip", "onnxruntime")


def _full_context_tokens(count: int):
    """``count`` prompts as token ids, one of them filling the whole context: every implementation
    then runs all 77 positions (clipcli otherwise stops at a batch's last end token)."""
    import clipcli

    prompts = build_prompts(count)[: count - 1] + [" ".join(["photo"] * 100)]
    return clipcli.tokenize(prompts, truncate=True)


def _towers(args, dtype: str) -> dict | None:
    """One implementation's image and text towers at ``dtype`` (None where it has no such
    precision): callables on float32 pixels and token ids, its input resolution, and whether
    it computes under bf16 autocast."""
    import torch

    if args.impl == "onnxruntime":
        if dtype != "fp32":  # the CPU execution provider has no bfloat16 kernels for these graphs
            return None
        import onnxruntime

        from clipcli.models.onnx_export import OnnxFiles, export_onnx

        model, _ = _load_clipcli(args.checkpoint, "fp32")
        path = Path(args.emb) / "onnx" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(model, path, overwrite=True)
        files, res = OnnxFiles.of(path), model.visual.input_resolution
        del model
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        sessions = [onnxruntime.InferenceSession(str(f), options, providers=["CPUExecutionProvider"])
                    for f in (files.visual, files.text)]
        return {"image": lambda x: torch.from_numpy(sessions[0].run(None, {"pixels": x.numpy()})[0]),
                "text": lambda t: torch.from_numpy(sessions[1].run(None, {"input_ids": t.numpy()})[0]),
                "resolution": res, "to": torch.float32, "autocast": False}
    if args.impl == "reference":
        _, model, _ = _load_reference(args.checkpoint, dtype)
    elif args.impl == "open_clip":
        import open_clip

        model = open_clip.load_openai_model(args.checkpoint, precision="fp32", device="cpu").eval()
    else:  # as the commands run it: blocks packed for oneDNN once reused (clipcli.pipeline.load_model)
        from clipcli.models.packed import enable_packing

        model, _ = _load_clipcli(args.checkpoint, dtype)
        enable_packing(model)
    # The references' fp32-only LayerNorm rejects bf16 weights on CPU: their bf16 is autocast.
    ours = args.impl == "clipcli"
    size = getattr(model.visual, "input_resolution", None) or getattr(model.visual, "image_size", None)
    return {"image": model.encode_image, "text": model.encode_text, "resolution": size if isinstance(size, int) else size[0],
            "to": torch.bfloat16 if ours and dtype == "bf16" else torch.float32, "autocast": not ours and dtype == "bf16"}


def task_model(args) -> dict:
    """Model-only forwards on preloaded tensors: the image tower at batch 1/8/32 and the text
    tower on a full-context batch of 32, fp32 and bf16, for one of :data:`MODEL_IMPLS` (clipcli
    as the commands run it; onnxruntime on clipcli's own ONNX export)."""
    import numpy as np
    import torch

    results = {}
    for dtype in ("fp32", "bf16"):
        towers = _towers(args, dtype)
        if towers is None:
            continue
        image, text, to = towers["image"], towers["text"], towers["to"]
        res = towers["resolution"]
        torch.manual_seed(0)
        images = torch.randn(max(args.batches) * 2, 3, res, res)
        tokens = _full_context_tokens(32)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=towers["autocast"]):
            for _ in range(2):  # warm up kernels and allocator (clipcli packs its blocks on the second run)
                image(images[:2].to(to)), text(tokens[:2])
            for batch in args.batches:
                seconds, n, out = _timed_batches(lambda x, image=image, to=to: image(x.to(to)).float(), images, batch,
                                                 args.budget, batch * 2)
                results[f"{dtype}/b{batch}"] = {"per_s": n / seconds, "images": n, "seconds": seconds}
            first = image(images[:8].to(to)).float()
            calls, start = 0, time.perf_counter()
            while calls < 2 or time.perf_counter() - start < args.budget:
                text(tokens)
                calls += 1
            seconds = time.perf_counter() - start
            results[f"{dtype}/text-b{len(tokens)}"] = {"per_s": calls * len(tokens) / seconds, "batches": calls,
                                                       "seconds": seconds}
            texts = text(tokens).float()
        np.save(Path(args.emb) / f"model-{args.impl}-{dtype}.npy", first.numpy())
        np.save(Path(args.emb) / f"model-text-{args.impl}-{dtype}.npy", texts.numpy())
        del towers, image, text
    return {"results": results}


def task_text(args) -> dict:
    """Short prompts: tokenize and encode_text in batches, as each package's README shows."""
    import numpy as np
    import torch

    prompts = json.loads(Path(args.prompts).read_text())
    if args.impl == "reference":
        clip, model, _ = _load_reference(args.checkpoint, "fp32")
        tokenize = clip.tokenize
    else:
        import clipcli

        model, _ = _load_clipcli(args.checkpoint, "fp32")
        tokenize = clipcli.tokenize
    with torch.inference_mode():
        model.encode_text(tokenize(prompts[:8]))
        seconds, n, out = _timed_batches(lambda p: model.encode_text(tokenize(p)).float(), prompts, args.text_batch, args.budget, args.text_batch)
    np.save(Path(args.emb) / f"text-{args.impl}.npy", torch.cat(out).numpy())
    extra = {}
    if args.impl == "clipcli":  # the pipeline the commands use: batches of similar length
        from clipcli.batching import embed_texts
        from clipcli.pipeline import LoadedModel

        loaded = LoadedModel(model, None, "bench", Path(args.checkpoint), torch.device("cpu"), torch.float32)
        start = time.perf_counter()
        results = embed_texts(loaded, prompts[:n], batch_size=args.text_batch, normalize=False)
        pipeline_s = time.perf_counter() - start
        np.save(Path(args.emb) / "text-clipcli-pipeline.npy", np.stack([r.embedding for r in results]))
        extra = {"pipeline_prompts_per_s": n / pipeline_s, "pipeline_seconds": pipeline_s}
    return {"prompts_per_s": n / seconds, "prompts": n, "of": len(prompts), "seconds": seconds, **extra}


def task_e2e(args) -> dict:
    """End to end in one process: start, load, decode, preprocess, encode every image."""
    import numpy as np

    start = time.perf_counter()
    files = sorted(Path(args.images).glob("*.jpg"))
    import torch
    from PIL import Image

    if args.impl == "reference":  # README: Image.open -> preprocess -> encode_image, batches of 32
        _, model, preprocess = _load_reference(args.checkpoint, "fp32")
        loaded = time.perf_counter()
        rows = []
        with torch.no_grad():
            for i in range(0, len(files), 32):
                batch = torch.stack([preprocess(Image.open(f)) for f in files[i : i + 32]])
                rows.append(model.encode_image(batch).float())
        embeddings = torch.cat(rows).numpy()
        extra = {}
    else:  # the library's own batching pipeline, as the commands run it
        from clipcli.batching import embed_images
        from clipcli.items import expand_inputs
        from clipcli.pipeline import load_model

        loaded_model = load_model(args.checkpoint, device="cpu", precision=args.dtype, towers=("image",))
        loaded = time.perf_counter()
        results = list(embed_images(loaded_model, expand_inputs([args.images]), batch_size=32, normalize=False))
        bad = [r.error for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"clipcli failed on {len(bad)} images: {bad[0]}")
        embeddings = np.stack([r.embedding for r in results])
        extra = {"path": "clipcli.batching.embed_images"}
    end = time.perf_counter()
    np.save(Path(args.emb) / f"{args.name}.npy", embeddings)
    return {"images": len(files), "load_s": loaded - start, "loop_s": end - loaded,
            "loop_images_per_s": len(files) / (end - loaded), **extra}


def _cli_command(args) -> list[str] | str:
    """``clipcli encode`` with the options its ``--help`` offers, or why it cannot run."""
    exe = [sys.executable, "-m", "clipcli"]
    probe = subprocess.run(exe + ["encode", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "clipcli encode is not available yet: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
    help_text = probe.stdout
    command = exe + ["encode"]
    for option, value in (("--model", args.checkpoint), ("--precision", args.dtype), ("--batch-size", "32"),
                          ("--device", "cpu"), ("--output", str(Path(args.emb) / f"{args.name}-cli.npy")),
                          ("--quiet", None), ("--overwrite", None), ("--threads", str(args.threads) if args.threads else None)):
        if option == "--threads" and value is None:
            continue
        if option in help_text:
            command += [option] if value is None else [option, value]
    return command + [args.images]


def task_cli(args) -> dict:
    """``clipcli encode`` as a whole CLI process; this child's RUSAGE_CHILDREN is its peak RSS."""
    import numpy as np

    command = _cli_command(args)
    if isinstance(command, str):
        return {"skipped": command}
    rss_file = Path(args.emb) / f"{args.name}-cli.rss"
    timed = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    done = subprocess.run(timed + command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"failed": f"exit {done.returncode}: {done.stderr.strip()[-500:]}", "command": command[2:]}
    output = Path(args.emb) / f"{args.name}-cli.npy"
    manifest = output.with_suffix(".jsonl")
    rows = []
    if output.exists() and manifest.exists():
        matrix = np.load(output)
        records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        rows = sorted((r["image"], matrix[r["index"]]) for r in records if r.get("index") is not None)
        np.save(Path(args.emb) / f"{args.name}.npy", np.asarray([r[1] for r in rows], dtype=np.float32))
    n = len(sorted(Path(args.images).glob("*.jpg")))
    rss = float(rss_file.read_text().split()[-1]) / 1024 if timed else _peak_rss_mb(resource.RUSAGE_CHILDREN)
    return {"images": n, "process_s": seconds, "process_images_per_s": n / seconds, "embeddings_read": len(rows),
            "child_peak_rss_mb": rss, "command": command[2:]}


def task_decode(args) -> dict:
    """Decode + preprocess only, one thread: the exact path vs reduced-size JPEG decoding
    (``Image.draft`` to the smallest DCT scale leaving >= 2x the model resolution)."""
    import numpy as np
    import torch
    from PIL import Image

    from clipcli.preprocess import Preprocess  # what the pipeline uses (bit-identical to clipcli.load's)

    model, _ = _load_clipcli(args.checkpoint, "fp32")
    res = model.visual.input_resolution
    preprocess = Preprocess(res)
    files = sorted(Path(args.images).glob("*.jpg"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def exact(f):
        return preprocess(Image.open(f))

    def drafted(f):
        image = Image.open(f)
        image.draft("RGB", (2 * res, 2 * res))  # keeps both sides >= 2*res
        return preprocess(image)

    out = {}
    tensors = {}
    for name, fn in (("exact", exact), ("draft", drafted)):
        start = time.perf_counter()
        tensors[name] = torch.stack([fn(f) for f in files])
        out[f"{name}_images_per_s"] = len(files) / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    with torch.inference_mode():
        a = torch.nn.functional.normalize(model.encode_image(tensors["exact"]), dim=-1)
        b = torch.nn.functional.normalize(model.encode_image(tensors["draft"]), dim=-1)
    cos = (a * b).sum(-1)
    out.update(draft_cosine_min=float(cos.min()), draft_cosine_mean=float(cos.mean()),
               pixel_max_abs_diff=float((tensors["exact"] - tensors["draft"]).abs().max()))
    np.save(Path(args.emb) / f"decode-{Path(args.images).name}.npy", cos.numpy())
    return out


def task_classify(args) -> dict:
    """``clipcli classify`` twice with an empty label cache: the first run embeds every label x
    template, the second finds them in the cache. Both are whole CLI processes."""
    import tempfile


    command = [sys.executable, "-m", "clipcli", "classify", "--model", args.checkpoint, "--labels-file", args.labels,
               "--templates", "imagenet7", "--device", "cpu", "--quiet", "--format", "jsonl", args.images]
    if args.threads:
        command += ["--threads", str(args.threads)]
    runs = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CLIPCLI_CACHE_DIR=cache)
        for _ in range(2):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            runs.append(time.perf_counter() - start)
            if done.returncode != 0:
                return {"failed": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
            records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
            runs.append([r.get("label") for r in records])
    labels = len(Path(args.labels).read_text().splitlines())
    return {"first_s": runs[0], "cached_s": runs[2], "cached_per_s": 1 / runs[2], "same_labels": runs[1] == runs[3],
            "labels": labels, "templates": 7, "images": len(runs[1])}


TASKS = {"model": task_model, "text": task_text, "e2e": task_e2e, "cli": task_cli, "decode": task_decode,
         "classify": task_classify}


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", required=True)
    parser.add_argument("--impl", default="clipcli")
    parser.add_argument("--name", default="")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", default="")
    parser.add_argument("--prompts", default="")
    parser.add_argument("--labels", default="")
    parser.add_argument("--emb", required=True)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--budget", type=float, default=5.0)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--text-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = TASKS[args.task](args)
    result.update(wall_in_process_s=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb(),
                  torch_threads=args.threads or torch.get_num_threads())
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_child(out: Path, label: str, threads: int = 0, **options) -> dict:
    result_file = out / "raw" / f"{label}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    # /usr/bin/time forks the child from a small process: a child forked from this driver would
    # inherit the driver's own high-water RSS in ru_maxrss.
    rss_file = result_file.with_suffix(".rss")
    timed = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] if Path("/usr/bin/time").exists() else []
    command = timed + [sys.executable, str(Path(__file__).resolve()), "--child"]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    command += ["--result", str(result_file)]
    env = dict(os.environ)
    if threads:  # `clipcli encode` gets both --threads and OMP_NUM_THREADS
        env["OMP_NUM_THREADS"] = str(threads)
        command += ["--threads", str(threads)]
    before = load_average()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=out, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        result = {"failed": done.stderr.strip()[-2000:]}
        result_file.write_text(json.dumps(result))
    else:
        result = json.loads(result_file.read_text())
        if timed:
            result["peak_rss_mb"] = float(rss_file.read_text().split()[-1]) / 1024
    result.update(process_wall_s=wall, load_average_before=before, load_average_after=load_average())
    result_file.write_text(json.dumps(result))
    print(f"  {label}: {wall:.1f}s, load {before[0]}", file=sys.stderr)
    return result


def run_script(out: Path, script: str, *argv) -> dict:
    """Another benchmark of this folder as a whole process (it does its own rounds), its JSON
    report read back from ``DIR/raw`` (``{"failed": ...}`` when it failed)."""
    result = out / "raw" / f"{Path(script).stem}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    print(f"  {script} {' '.join(map(str, argv))} ...", file=sys.stderr)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / script), *map(str, argv),
                           "--out", str(result)], capture_output=True, text=True, cwd=out)
    if done.returncode != 0:
        return {"failed": done.stderr.strip()[-2000:]}
    return json.loads(result.read_text())


def _better(old: dict | None, new: dict, key: str) -> dict:
    """Keep the faster of two rounds (a shared machine only ever slows a run down)."""
    if old is None or "failed" in old or "skipped" in old:
        return new
    if "failed" in new or "skipped" in new:
        return old
    return new if _get(new, key) > _get(old, key) else old


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


def environment() -> dict:
    import importlib.metadata as md

    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1]
                break
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    import torch

    versions = {}
    for dist in ("torch", "torchvision", "pillow", "numpy", "openai-clip", "open_clip_torch", "clipcli"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx_vnni")
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": [f for f in wanted if f in flags.split()],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "simd_pillow": "post" in (versions.get("pillow") or ""),
    }


def cosine_stats(a, b) -> dict:
    import numpy as np

    n = min(len(a), len(b))
    a, b = np.asarray(a[:n], dtype=np.float64), np.asarray(b[:n], dtype=np.float64)
    a, b = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
    cos = (a * b).sum(-1)
    return {"min": float(cos.min()), "mean": float(cos.mean()), "n": n,
            "max_abs_diff_unit": float(np.abs(a - b).max())}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return {}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few images, short budgets (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out", help="work and results folder")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (best counts); 2, 1 with --smoke")
    parser.add_argument("--only", default="model,text,e2e,cli,decode,classify",
                        help="comma-separated task groups; also cold (cold_start.py) and search (index.py: 1M "
                             "and 10M vectors, about 30 GB of files in DIR/index)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (and OMP_NUM_THREADS) for every process; 0: torch's default")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild results.json and the table from DIR/raw (e.g. after an interrupted run)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rounds = args.rounds or (1 if args.smoke else 2)
    only = set(args.only.split(","))
    sets = SMOKE_SETS if args.smoke else FULL_SETS
    architecture = "tiny-vit" if args.smoke else "ViT-B/32"
    budget = 0.3 if args.smoke else 4.0
    text_budget = 0.3 if args.smoke else 12.0
    batches = "1,2" if args.smoke else "1,8,32"

    print("building data ...", file=sys.stderr)
    checkpoint = build_checkpoint(out / "data" / f"{architecture.replace('/', '-')}-random.pt", architecture)
    image_sets = {name: build_image_set(out / "data" / name, *spec, seed=i) for i, (name, spec) in enumerate(sets.items())}
    prompts_file = out / "data" / "prompts.json"
    prompts = build_prompts(20 if args.smoke else 1000)
    prompts_file.write_text(json.dumps(prompts))
    labels_file = out / "data" / "labels.txt"  # classify refuses a label given twice
    labels_file.write_text("\n".join(dict.fromkeys(build_labels(20 if args.smoke else 1000))) + "\n")
    emb = out / "embeddings"
    if not args.report_only:
        shutil.rmtree(emb, ignore_errors=True)
        emb.mkdir()
    common = dict(checkpoint=checkpoint, emb=emb, threads=args.threads)

    report: dict = {"smoke": args.smoke, "architecture": architecture, "rounds": rounds, "threads": args.threads or "default", "environment": environment(),
                    "data": {name: {"images": len(files), "size": list(sets[name][1:3]), "quality": sets[name][3],
                                    "mean_bytes": sum(f.stat().st_size for f in files) // len(files)}
                             for name, files in image_sets.items()} | {"prompts": len(prompts)},
                    "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "measurements": {}}
    m = report["measurements"]

    plan: list[tuple[str, str, dict]] = []  # (label, key to compare, child options), one round
    for impl in MODEL_IMPLS if "model" in only else ():
        plan.append((f"model-{impl}", "wall_in_process_s", dict(task="model", impl=impl, budget=budget, batches=batches)))
    for impl in ("reference", "clipcli") if "text" in only else ():
        plan.append((f"text-{impl}", "prompts_per_s", dict(task="text", impl=impl, budget=text_budget, prompts=prompts_file,
                                                           text_batch=8 if args.smoke else 256)))
    for name in sets:
        images = out / "data" / name
        if "e2e" in only:
            plan.append((f"e2e-{name}-reference", "loop_images_per_s", dict(task="e2e", impl="reference", images=images, name=f"e2e-{name}-reference")))
            for dtype in ("fp32", "bf16"):
                plan.append((f"e2e-{name}-clipcli-{dtype}", "loop_images_per_s",
                             dict(task="e2e", impl="clipcli", dtype=dtype, images=images, name=f"e2e-{name}-clipcli-{dtype}")))
        if "cli" in only:
            for dtype in ("fp32", "bf16"):
                plan.append((f"cli-{name}-{dtype}", "process_images_per_s",
                             dict(task="cli", dtype=dtype, images=images, name=f"cli-{name}-{dtype}")))
        if "decode" in only:
            plan.append((f"decode-{name}", "exact_images_per_s", dict(task="decode", images=images)))
    if "classify" in only:
        plan.append(("classify", "cached_per_s", dict(task="classify", images=out / "data" / "camera", labels=labels_file)))

    for r in range(0 if args.report_only else rounds):
        print(f"round {r + 1}/{rounds}", file=sys.stderr)
        # Alternate the order each round so neither side always runs first.
        for label, key, options in (plan if r % 2 == 0 else _swap_pairs(plan)):
            result = run_child(out, f"{label}-r{r}", **common, **options)
            if label.startswith("model-"):
                result["_score"] = -result.get("wall_in_process_s", 1e9) if "failed" not in result else 0
                key = "_score"
            m[label] = _better(m.get(label), result, key)

    scripts = {"cold": ("cold_start.py", "--rounds", max(rounds, 3), "--work", out / "cold_start"),
               "search": ("index.py", "--only", "search,scan", "--work", out / "index",
                          "--vectors", 20_000 if args.smoke else 1_000_000,
                          "--scan-vectors", 50_000 if args.smoke else 10_000_000)}
    for group, (script, *script_args) in scripts.items():
        if group not in only:
            continue
        raw = out / "raw" / f"{Path(script).stem}.json"
        m[group] = run_script(out, script, *script_args) if not args.report_only else \
            json.loads(raw.read_text()) if raw.exists() else {"failed": "not run"}

    if args.report_only:
        for label, key, _ in plan:
            for raw in sorted((out / "raw").glob(f"{label}-r*.json")):
                result = json.loads(raw.read_text())
                if label.startswith("model-"):
                    result["_score"] = -result.get("wall_in_process_s", 1e9) if "failed" not in result else 0
                    key = "_score"
                result.setdefault("load_average_before", ["?"])
                if "process_wall_s" not in result and "wall_in_process_s" in result:
                    result["process_wall_s"] = result["wall_in_process_s"]
                m[label] = _better(m.get(label), result, key)
        report["rounds"] = "recovered"
    report["summary"] = summarize(m, emb, sets)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print(markdown(report))
    return report


def _swap_pairs(plan: list) -> list:
    """The plan with the order reversed within each group of measurements (the model-only
    implementations; each reference/clipcli neighbour pair)."""
    plan = list(plan)
    models = [i for i, (label, _, _) in enumerate(plan) if label.startswith("model-")]
    if models:
        plan[models[0] : models[-1] + 1] = plan[models[0] : models[-1] + 1][::-1]
    for i in range(len(models), len(plan) - 1, 2):
        if "reference" in plan[i][0] and "clipcli" in plan[i + 1][0]:
            plan[i], plan[i + 1] = plan[i + 1], plan[i]
    return plan


SCRIPT_GROUPS = ("cold", "search")  # measured by cold_start.py and index.py, which report their own RSS


def summarize(m: dict, emb: Path, sets: dict) -> dict:
    import numpy as np

    def load(name):
        path = emb / f"{name}.npy"
        return np.load(path) if path.exists() else None

    def ok(label):
        return label in m and "failed" not in m[label] and "skipped" not in m[label]

    s: dict = {"model_only": {}, "text": {}, "e2e": {}, "agreement": {}, "peak_rss_mb": {}}
    impls = [impl for impl in MODEL_IMPLS if ok(f"model-{impl}")]
    if "clipcli" in impls:
        ours = m["model-clipcli"]["results"]
        def rate(impl, key):  # raw results from before the text rows call it images_per_s
            found = m[f"model-{impl}"]["results"].get(key, {})
            return found.get("per_s", found.get("images_per_s"))

        for key in ours:
            s["model_only"][key] = {impl: rate(impl, key) for impl in impls}
        for b in dict.fromkeys(k.split("/")[1] for k in ours):
            s["model_only"][f"clipcli bf16/fp32 {b}"] = rate("clipcli", f"bf16/{b}") / rate("clipcli", f"fp32/{b}")
        for impl in impls:
            for dtype in ("fp32", "bf16"):
                for tower in ("", "text-"):
                    a, b = load(f"model-{tower}reference-fp32"), load(f"model-{tower}{impl}-{dtype}")
                    if a is not None and b is not None and (impl, dtype) != ("reference", "fp32"):
                        s["agreement"][f"model-only {tower or 'image-'}tower {impl} {dtype} vs reference fp32"] = \
                            cosine_stats(a, b)
    if ok("text-reference") and ok("text-clipcli"):
        r, c = m["text-reference"], m["text-clipcli"]
        s["text"] = {"reference": r["prompts_per_s"], "clipcli": c["prompts_per_s"], "ratio": c["prompts_per_s"] / r["prompts_per_s"]}
        if "pipeline_prompts_per_s" in c:
            s["text"]["pipeline"] = c["pipeline_prompts_per_s"]
            s["text"]["pipeline_ratio"] = c["pipeline_prompts_per_s"] / r["prompts_per_s"]
        a = load("text-reference")
        for name, label in (("text-clipcli", "text clipcli vs reference"), ("text-clipcli-pipeline", "text clipcli pipeline vs reference")):
            b = load(name)
            if a is not None and b is not None:
                rows = min(len(a), len(b))  # each side embeds the prompts its time budget allows, in order
                s["agreement"][label] = cosine_stats(a[:rows], b[:rows])
    for name in sets:
        ref = m.get(f"e2e-{name}-reference")
        if not ok(f"e2e-{name}-reference"):
            if ok(f"decode-{name}"):
                d = m[f"decode-{name}"]
                s["e2e"][name] = {"decode one thread": {k: d[k] for k in ("exact_images_per_s", "draft_images_per_s",
                                                                           "draft_cosine_min", "draft_cosine_mean")}}
            continue
        row = {"reference": {"process_images_per_s": ref["images"] / ref["process_wall_s"], "loop_images_per_s": ref["loop_images_per_s"]}}
        base = load(f"e2e-{name}-reference")
        for dtype in ("fp32", "bf16"):
            for kind in ("e2e", "cli"):
                label = f"{kind}-{name}-clipcli-{dtype}" if kind == "e2e" else f"cli-{name}-{dtype}"
                if not ok(label):
                    row[f"{kind} {dtype}"] = m.get(label, {}).get("skipped") or "failed"
                    continue
                res = m[label]
                per_s = res["images"] / res["process_wall_s"] if kind == "e2e" else res["process_images_per_s"]
                entry = {"process_images_per_s": per_s, "ratio": per_s / row["reference"]["process_images_per_s"]}
                if kind == "e2e":
                    entry["loop_images_per_s"] = res["loop_images_per_s"]
                    entry["loop_ratio"] = res["loop_images_per_s"] / ref["loop_images_per_s"]
                row[f"{kind} {dtype}"] = entry
                other = load(label)
                if base is not None and other is not None:
                    s["agreement"][f"{label} vs reference"] = cosine_stats(base, other)
        if ok(f"decode-{name}"):
            d = m[f"decode-{name}"]
            row["decode one thread"] = {k: d[k] for k in ("exact_images_per_s", "draft_images_per_s", "draft_cosine_min", "draft_cosine_mean")}
        s["e2e"][name] = row
    if ok("classify"):
        c = m["classify"]
        s["classify"] = {k: c[k] for k in ("first_s", "cached_s", "same_labels", "labels", "templates", "images")}
    if ok("cold"):
        s["cold_start"] = {name: {"best_s": p["wall_s"]["best"], "median_s": p["wall_s"]["median"],
                                  "beyond_import_torch_s": p["beyond_s"]["import torch"], "peak_rss_mb": p["peak_rss_mb"]}
                           for name, p in m["cold"]["process"].items()}
        s["cold_start_steps"] = {name: {step: t["best"] for step, t in steps.items() if isinstance(t, dict)}
                                 for name, steps in m["cold"].get("steps", {}).items()}
    if ok("search"):
        found = m["search"]
        s["search"] = {part: {k: v for k, v in found[part].items() if not isinstance(v, list)}
                       for part in ("search", "scan") if part in found}
    for label, res in m.items():
        if "failed" in res or "skipped" in res or label in SCRIPT_GROUPS:
            continue
        s["peak_rss_mb"][label] = res.get("child_peak_rss_mb", res.get("peak_rss_mb"))
    return s


def _f(x, digits=1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def _threads(report: dict) -> str:
    used = sorted({str(r["torch_threads"]) for r in report["measurements"].values() if "torch_threads" in r})
    return "/".join(used) or str(report["environment"]["torch_threads"])


def markdown(report: dict) -> str:
    s, env = report["summary"], report["environment"]
    lines = [f"Run {report['started']} ({'smoke' if report['smoke'] else 'full'}, {report['architecture']}, "
             f"best of {report['rounds']} interleaved rounds); {env['cpu']}, {env['cpu_count']} cores, torch threads per process "
             f"{_threads(report)}, flags {' '.join(env['cpu_flags'])}, torch capability {env['torch_cpu_capability']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v), ""]
    impls = [impl for impl in MODEL_IMPLS if any(isinstance(row, dict) and row.get(impl) for row in s["model_only"].values())]
    if impls:
        lines += ["| model-only (images or texts /s) | " + " | ".join(impls)
                  + " | clipcli / " + " | clipcli / ".join(i for i in impls if i != "clipcli") + " |",
                  "|---|" + "---:|" * (2 * len(impls) - 1)]
        for key, row in s["model_only"].items():
            if isinstance(row, dict):
                ratios = [_f(row["clipcli"] / row[i], 2) + "x" if row.get(i) else "" for i in impls if i != "clipcli"]
                lines.append(f"| {key} | " + " | ".join(_f(row.get(i) or "") for i in impls) + " | " + " | ".join(ratios) + " |")
        speedups = [f"{key.split()[-1]} {_f(row, 2)}x" for key, row in s["model_only"].items() if not isinstance(row, dict)]
        lines += ["", "clipcli bf16 / clipcli fp32, model-only: " + ", ".join(speedups), ""]
    table = len(lines)
    lines += ["| measurement | reference | clipcli | ratio |", "|---|---:|---:|---:|"]
    if s["text"]:
        t = s["text"]
        lines.append(f"| text, short prompts (prompts/s) | {_f(t['reference'])} | {_f(t['clipcli'])} | {_f(t['ratio'], 2)}x |")
        if "pipeline" in t:
            lines.append(f"| text, short prompts, `pipeline.embed_texts` (length-sorted batches) (prompts/s) | {_f(t['reference'])} | "
                         f"{_f(t['pipeline'])} | {_f(t['pipeline_ratio'], 2)}x |")
    for name, row in s["e2e"].items():
        ref = row.get("reference")
        for kind in ("e2e fp32", "e2e bf16", "cli fp32", "cli bf16") if ref else ():
            entry = row.get(kind)
            what = ("API" if kind.startswith("e2e") else "`clipcli encode`") + " " + kind.split()[1]
            if isinstance(entry, dict):
                lines.append(f"| {name} end to end, {what}, whole process (images/s) | {_f(ref['process_images_per_s'])} | "
                             f"{_f(entry['process_images_per_s'])} | {_f(entry['ratio'], 2)}x |")
                if "loop_images_per_s" in entry:
                    lines.append(f"| {name} end to end, {what}, after load (images/s) | {_f(ref['loop_images_per_s'])} | "
                                 f"{_f(entry['loop_images_per_s'])} | {_f(entry['loop_ratio'], 2)}x |")
            elif entry is not None:
                lines.append(f"| {name} end to end, {what} | {_f(ref['process_images_per_s'])} | {entry} | |")
        d = row.get("decode one thread")
        if d:
            lines.append(f"| {name} decode+preprocess, 1 thread: exact vs draft (images/s) | {_f(d['exact_images_per_s'])} | "
                         f"{_f(d['draft_images_per_s'])} (draft, cos min {d['draft_cosine_min']:.4f}) | "
                         f"{_f(d['draft_images_per_s'] / d['exact_images_per_s'], 2)}x |")
    c = s.get("classify")
    if c:
        lines.append(f"| `clipcli classify`, {c['labels']:,} labels x {c['templates']} templates, {c['images']} images: "
                     f"first run vs label cache (s, whole process) | {_f(c['first_s'])} | {_f(c['cached_s'])} | "
                     f"{_f(c['first_s'] / c['cached_s'], 2)}x{'' if c['same_labels'] else ' (labels differ!)'} |")
    if len(lines) == table + 2:  # no rows: no table
        del lines[table:]
    lines += ["", "| agreement (cosine to the reference) | min | mean | max abs diff (unit vectors) |", "|---|---:|---:|---:|"]
    for key, a in s["agreement"].items():
        lines.append(f"| {key} | {a['min']:.6f} | {a['mean']:.6f} | {a['max_abs_diff_unit']:.2e} |")
    if s.get("cold_start"):
        lines += ["", "| cold one-image `classify` (whole process) | best (s) | median (s) | best beyond `import torch` (s) "
                      "| peak RSS (MB) |", "|---|---:|---:|---:|---:|"]
        for name, c in s["cold_start"].items():
            lines.append(f"| {name} | {_f(c['best_s'], 2)} | {_f(c['median_s'], 2)} | "
                         f"{_f(c['beyond_import_torch_s'], 2)} | {_f(c['peak_rss_mb'], 0)} |")
        for name, steps in s.get("cold_start_steps", {}).items():
            lines.append(f"\nsteps of {name} (best, s): " + ", ".join(f"{k} {_f(v, 3)}" for k, v in steps.items()))
    search = s.get("search", {})
    if search:
        lines += ["", "| search | vectors | median per query (ms) | same top 10 as float32 | peak RSS (MB) |",
                  "|---|---:|---:|---|---:|"]
        if "search" in search:
            q = search["search"]
            lines.append(f"| `search()` in process, bfloat16 scan + float32 re-rank | {q['vectors']:,} | "
                         f"{_f(q['query_ms_median'])} | {q.get('same_top10', '')} | {_f(q.get('search_peak_rss_mb'), 0)} |")
        if "scan" in search:
            q = search["scan"]
            lines.append(f"| top 10 from the memory-mapped cache | {q['vectors']:,} | {_f(q['top10_ms_median'])} | | "
                         f"{_f(q['peak_rss_mb'], 0)} |")
    lines += ["", "| process | peak RSS (MB) | load average (1 min) before |", "|---|---:|---:|"]
    for key, rss in s["peak_rss_mb"].items():
        lines.append(f"| {key} | {_f(rss, 0)} | {report['measurements'][key].get('load_average_before', ['?'])[0]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
