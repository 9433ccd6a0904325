"""Tokenizer throughput: clipcli's SentencePiece tokenizers against ``tokenizers`` and ``sentencepiece``.

For each family's vocabulary (SigLIP's T5 Unigram, SigLIP 2's Gemma BPE, MetaCLIP 2's XLM-V
Unigram; trained small here as the tests train them, or real files with ``--folder``), on 10,000
prompts (the 7 ``imagenet7`` templates over generated labels) and 10,000 lines of the tests'
multilingual corpus:

- model level: :class:`clipcli.text.tokenizers.PieceTokenizer` (cleaning, ids, special tokens,
  padding to a tensor) against open_clip's ``HFTokenizer`` over the same folder (transformers);
- ids only, on cleaned text: clipcli's ``tokenizer.json`` reader against ``tokenizers`` (one text
  at a time, and ``encode_batch``, which uses every core), clipcli's ``.model`` reader against
  ``sentencepiece``.

clipcli caches the ids of each word, so its first pass over a prompt set ("cold") and later
passes ("warm") are both reported. Ids are compared while timing: a row that differs is counted
and printed, so a fast wrong answer cannot pass. CPU flags are recorded with the numbers.

    python benchmarks/tokenizer_speed.py [--count 10000] [--folder t5=PATH ...] [--out results/tokenizers-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from run import build_prompts, environment  # noqa: E402  (the shared machine description, the prompt set)

FAMILIES = {"t5": (64, "canonicalize"), "gemma": (64, "canonicalize"), "xlmv": (77, "whitespace")}
MODEL_NAMES = {"t5": "spiece.model", "gemma": "tokenizer.model", "xlmv": "sentencepiece.bpe.model"}


def _timed(run) -> tuple[float, object]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def measure(kind: str, folder: Path, texts: list[str]) -> dict:
    import sentencepiece
    import tokenizers
    import torch
    from open_clip.tokenizer import HFTokenizer

    from clipcli.text.canonicalize import cleaner
    from clipcli.text.sentencepiece import SentencePiece
    from clipcli.text.tokenizer_json import JsonTokenizer
    from clipcli.text.tokenizers import TOKENIZER_FILES, PieceTokenizer

    context_length, clean = FAMILIES[kind]
    files = {name: folder / name for name in TOKENIZER_FILES if (folder / name).exists()}
    row: dict = {"family": kind, "texts": len(texts), "context_length": context_length, "clean": clean}

    ours = PieceTokenizer(files, context_length, clean)
    row["load_s"], _ = _timed(lambda: ours(["warm up"], truncate=True))
    row["model_cold_s"], ids = _timed(lambda: ours(texts, truncate=True))
    row["model_warm_s"], _ = _timed(lambda: ours(texts, truncate=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = HFTokenizer(str(folder), context_length=context_length, clean=clean)
        row["model_reference_s"], expected = _timed(lambda: reference(texts))
    row["model_rows_differing"] = int((ids != expected).any(dim=1).sum()) if isinstance(ids, torch.Tensor) else -1

    cleaned = [cleaner(clean)(text) for text in texts]
    json_ours = JsonTokenizer.from_file(folder / "tokenizer.json")
    json_reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    row["json_cold_s"], ours_ids = _timed(lambda: [json_ours.prefix + json_ours.encode(t) + json_ours.suffix for t in cleaned])
    row["json_warm_s"], _ = _timed(lambda: [json_ours.encode(t) for t in cleaned])
    row["tokenizers_one_by_one_s"], _ = _timed(lambda: [json_reference.encode(t).ids for t in cleaned])
    row["tokenizers_batch_s"], batch = _timed(lambda: [e.ids for e in json_reference.encode_batch(cleaned)])
    row["json_differing"] = sum(a != b for a, b in zip(ours_ids, batch))

    model_file = folder / MODEL_NAMES[kind]
    if model_file.exists():
        spm_ours = SentencePiece.from_file(model_file)
        spm_reference = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        row["model_file_cold_s"], ours_ids = _timed(lambda: [spm_ours.encode(t) for t in cleaned])
        row["model_file_warm_s"], _ = _timed(lambda: [spm_ours.encode(t) for t in cleaned])
        row["sentencepiece_s"], expected_ids = _timed(lambda: spm_reference.encode(cleaned))
        row["model_file_differing"] = sum(a != b for a, b in zip(ours_ids, expected_ids))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def _folders(args) -> dict[str, Path]:
    folders = {}
    for spec in args.folder:
        kind, _, path = spec.partition("=")
        folders[kind] = Path(path)
    missing = [kind for kind in FAMILIES if kind not in folders]
    if missing:
        import spm_models  # the tests' trained vocabularies, in hub-style folders

        for kind in missing:
            folder = spm_models.hf_folder(kind)
            (folder / MODEL_NAMES[kind]).write_bytes(spm_models.model_file(kind).read_bytes())
            folders[kind] = folder
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="texts per set")
    parser.add_argument("--folder", action="append", default=[], metavar="FAMILY=PATH",
                        help="real tokenizer files for a family (t5, gemma, xlmv) instead of the trained ones")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    import spm_models

    sets = {"prompts": build_prompts(-(-args.count // 7))[: args.count],
            "multilingual": spm_models.corpus(args.count, seed=7)[: args.count]}
    env = environment()
    print(f"# {env['cpu']} ({env['cpu_count']} cores), flags {' '.join(env['cpu_flags'])}, python {env['python']}",
          file=sys.stderr)
    rows = []
    for kind, folder in _folders(args).items():
        for name, texts in sets.items():
            row = {"set": name, **measure(kind, folder, texts)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print("| family | set | clipcli model cold / warm (texts/s) | open_clip HFTokenizer | tokenizer.json cold / warm "
          "| tokenizers 1-by-1 / batch | .model cold / warm | sentencepiece | rows differing |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        def rate(key: str, r: dict = r) -> str:
            return f"{r['texts'] / r[key]:,.0f}" if r.get(key) else "-"

        differing = r["model_rows_differing"] + r["json_differing"] + r.get("model_file_differing", 0)
        print(f"| {r['family']} | {r['set']} | {rate('model_cold_s')} / {rate('model_warm_s')} | {rate('model_reference_s')} "
              f"| {rate('json_cold_s')} / {rate('json_warm_s')} | {rate('tokenizers_one_by_one_s')} / {rate('tokenizers_batch_s')} "
              f"| {rate('model_file_cold_s')} / {rate('model_file_warm_s')} | {rate('sentencepiece_s')} | {differing} |")
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
