"""Cold start of a one-image ``clipcli classify`` (issue 27, item 3), measured on this machine.

A cold run is a new process: ``clipcli classify IMG -l cat -l dog -m MODEL``, with the model's
weights on disk (page cache warm), its label embeddings already in clipcli's cache (a run
before the rounds fills it, as any first use does) and Python's bytecode cached, as for an
installed package. The targets: at most 0.4 s beyond ``import torch``, and a peak RSS of at
most 1.0 GB for ViT-B/32 in fp32.

- ``process``: whole processes under ``/usr/bin/time``: two floors, ``python -c "import torch"``
  (as a user runs it, with Python's exit, which after torch takes 0.3 to 0.4 s and 128 MB) and
  the same ending with ``os._exit`` (as clipcli's commands end), then one classify per model,
  interleaved round by round (the machine may be shared: each round sees the same load); best,
  median and worst wall time of ``--rounds``, best CPU time, worst peak RSS.
- ``steps``: the same command run in one process (``--steps``) with each step timed by wrapping
  the library function that does it: import torch, import clipcli.cli, the arguments (Typer),
  resolve, read weights, build model, tokenizer, label cache (model identity + the cached
  embeddings), decode, forward; "other" is the rest of the command (its imports, the output).
  Steps that do not run on a cold path (the tokenizer, when the labels are cached) read 0.

Models (random weights, ViT-B/32's shapes; built once in ``--work``): OpenAI's released format
(a float16 TorchScript ``.pt``) and the same weights converted by ``clipcli convert`` to
safetensors as float16 and as float32 (what the hub's fp32 copy of OpenAI's weights is).

    python benchmarks/cold_start.py [--rounds 5] [--work DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = ("cat", "dog")


def build_models(work: Path) -> dict[str, Path]:
    """The three files of one random ViT-B/32: OpenAI's ``.pt``, fp16 and fp32 safetensors."""
    sys.path.insert(0, str(HERE))
    from run import build_checkpoint

    released = build_checkpoint(work / "vit-b-32.pt", "ViT-B/32")
    models = {"openai-pt-fp16": released}
    for dtype in ("float16", "float32"):
        path = work / f"vit-b-32-{dtype}.safetensors"
        if not path.exists():
            from clipcli.tasks import convert_checkpoint

            convert_checkpoint(released, path, dtype=dtype)
        models[f"safetensors-{dtype.replace('float', 'fp')}"] = path
    return models


def build_image(work: Path) -> Path:
    """A 640x480 JPEG of noise (a web-size photo's decoding cost)."""
    path = work / "img.jpg"
    if not path.exists():
        import numpy as np
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return path


def classify_args(image: Path, model: Path) -> list[str]:
    labels = [arg for label in LABELS for arg in ("-l", label)]
    return ["classify", str(image), *labels, "-m", str(model), "--device", "cpu", "-q", "--format", "jsonl"]


def measured(command: list[str], env: dict) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS in MB, stdout) of ``command`` as a whole process.
    CPU time (user + system) varies less than wall time on a shared machine."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", *command], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    peak, user, system = done.stderr.strip().splitlines()[-1].split()
    return elapsed, float(user) + float(system), int(peak) / 1024, done.stdout


def summary(values: list[float]) -> dict:
    return {"best": round(min(values), 3), "median": round(statistics.median(values), 3),
            "worst": round(max(values), 3), "runs": [round(v, 3) for v in values]}


# --------------------------------------------------------------------------- one process, by step


STEPS = (("resolve", "clipcli.loading", "resolve"),
         ("read weights", "clipcli.checkpoint", "read_checkpoint"),
         ("build model", "clipcli.models.factory", "build_model"),
         ("tokenizer", "clipcli.text.tokenizers", "tokenizer_for"),
         ("label cache", "clipcli.pipeline", "label_classifier"),
         ("decode", "clipcli.batching", "prepare_image"),
         ("forward", "clipcli.batching", "run_batches"))


def steps_main(argv: list[str]) -> None:
    """Run ``clipcli ARGS`` in this process, timing each step; print them as JSON on stderr's
    last line (stdout carries the command's records)."""
    import resource

    start = time.perf_counter()
    import torch  # noqa: F401

    times = {"import torch": time.perf_counter() - start}
    mark = time.perf_counter()
    import clipcli.cli  # noqa: F401  (what every command imports first)

    times["import clipcli.cli"] = time.perf_counter() - mark
    # A step's module is wrapped when something first imports it, so the imports a step makes
    # on first use count in that step, and a module the command never imports costs nothing.
    times["arguments"] = 0.0
    for step, _, _ in STEPS:
        times.setdefault(step, 0.0)
    wrapped: set[str] = set()

    def wrap(module) -> None:
        for step, module_name, attribute in STEPS:
            original = getattr(module, attribute, None)  # None: the module is still being imported
            if module.__name__ != module_name or (module_name, attribute) in wrapped or original is None:
                continue
            wrapped.add((module_name, attribute))

            def timed(*a, _original=original, _step=step, **kw):
                mark = time.perf_counter()
                try:
                    return _original(*a, **kw)
                finally:
                    times[_step] += time.perf_counter() - mark

            setattr(module, attribute, timed)

    import builtins

    real_import = builtins.__import__
    names = {module for _, module, _ in STEPS}

    def importing(*a, **kw):  # wraps each step's module as soon as something imports it
        module = real_import(*a, **kw)
        for name in names:
            if name in sys.modules:
                wrap(sys.modules[name])
        return module

    for name in names:
        if name in sys.modules:
            wrap(sys.modules[name])
    builtins.__import__ = importing
    cli = sys.modules["clipcli.cli.app"]
    run_command = cli._run_and_flush

    def entered(*a, **kw):  # the command's own code starts: the arguments are parsed
        times["arguments"] = time.perf_counter() - mark
        return run_command(*a, **kw)

    cli._run_and_flush = entered
    sys.argv = ["clipcli", *argv]
    mark = time.perf_counter()
    try:
        only = getattr(cli, "only_command", None)  # absent before issue 27: an older tree measured
        with only(sys.argv) if only else contextlib.nullcontext():  # as main() runs it (which also ends the process)
            cli.app()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    finally:
        builtins.__import__ = real_import
    times["command"] = time.perf_counter() - mark
    times["other"] = times["command"] - times["arguments"] - sum(times[step] for step, _, _ in STEPS)
    times["total"] = time.perf_counter() - start
    times["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.flush()
    print(json.dumps(times), file=sys.stderr)


def breakdown(image: Path, model: Path, env: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--steps", *classify_args(image, model)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"--steps {model} failed: {done.stderr[-2000:]}")
    return json.loads(done.stderr.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=HERE / "out" / "cold_start")
    parser.add_argument("--only", default="", help="comma-separated model labels (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from duplicates import cpu_flags
    from run import environment, load_average

    args.work.mkdir(parents=True, exist_ok=True)
    models = build_models(args.work)
    if args.only:
        models = {k: v for k, v in models.items() if k in args.only.split(",")}
    image = build_image(args.work)
    # Bytecode cached as an installed package has it (PYTHONDONTWRITEBYTECODE would compile
    # clipcli's modules on every run), kept in --work, out of the source tree.
    env = {**os.environ, "CLIPCLI_CACHE_DIR": str(args.work / "cache"), "PYTHONPYCACHEPREFIX": str(args.work / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    clipcli = [sys.executable, "-m", "clipcli"]
    report: dict = {"environment": {**environment(), "cpu_flags_all": cpu_flags()}, "load_before": load_average(),
                    "rounds": args.rounds, "first_run": {}, "outputs": {}}
    for label, model in models.items():  # fills the label cache (and anything a first use writes)
        seconds, _, rss, out = measured([*clipcli, *classify_args(image, model)], env)
        report["first_run"][label] = {"s": round(seconds, 3), "peak_rss_mb": round(rss)}
        report["outputs"][label] = json.loads(out)
    # The floor: importing torch, with Python's usual exit (what `python -c "import torch"` costs
    # a user) and without tearing the interpreter down (what clipcli's commands do).
    floors = {"import torch": [sys.executable, "-c", "import torch"],
              "import torch, no teardown": [sys.executable, "-c", "import os, torch; os._exit(0)"]}
    runs = {**floors, **{label: [*clipcli, *classify_args(image, model)] for label, model in models.items()}}
    wall: dict[str, list[float]] = {key: [] for key in runs}
    cpu: dict[str, list[float]] = {key: [] for key in runs}
    rss: dict[str, list[float]] = {key: [] for key in runs}
    steps: dict[str, list[dict]] = {label: [] for label in models}
    for _ in range(args.rounds):
        for key, command in runs.items():
            seconds, cpu_seconds, peak, _ = measured(command, env)
            wall[key].append(seconds)
            cpu[key].append(cpu_seconds)
            rss[key].append(peak)
        for label, model in models.items():
            steps[label].append(breakdown(image, model, env))
    best = {floor: min(wall[floor]) for floor in floors}
    report["process"] = {key: {"wall_s": summary(values), "cpu_s": summary(cpu[key]),
                               "peak_rss_mb": round(max(rss[key])),
                               "beyond_s": {floor: round(min(values) - best[floor], 3) for floor in floors}}
                         for key, values in wall.items()}
    report["steps"] = {label: {step: summary([run[step] for run in runs]) for step in runs[0]}
                       for label, runs in steps.items()}
    report["load_after"] = load_average()
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"CPU: {env['cpu']} ({env['cpu_count']} cores; flags {' '.join(env['cpu_flags'])}); "
             f"load {report['load_before']} -> {report['load_after']}; best of {report['rounds']}, interleaved.", "",
             "| process | best s | median s | worst s | CPU s (best) | beyond import torch | beyond it without "
             "teardown | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for key, row in report["process"].items():
        wall, beyond = row["wall_s"], list(row["beyond_s"].values())
        lines.append(f"| {key} | {wall['best']:.2f} | {wall['median']:.2f} | {wall['worst']:.2f} | "
                     f"{row['cpu_s']['best']:.2f} | {beyond[0]:+.2f} | {beyond[1]:+.2f} | {row['peak_rss_mb']} |")
    labels = list(report["steps"])
    if labels:
        lines += ["", "| step (median s) | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for step in report["steps"][labels[0]]:
            cells = [f"{report['steps'][label][step]['median']:.3f}" for label in labels]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--steps"]:
        steps_main(sys.argv[2:])
    else:
        main()
