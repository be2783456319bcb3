"""Does llama.cpp serve what qopt measured? A deploy study's best strategy as GGUF, run in the engine.

For each study config (made with `search.deploy: llamacpp`): create and launch the study
(`--trials`), take `qopt study best --max-bpw B` (validation re-ranking), export it with
`qopt export --format gguf`, then measure perplexity on the study's held-out windows twice:
in qopt's own harness (fake-quantized PyTorch) and in llama.cpp (llama-cpp-python, the
file as written). The unquantized source is run the same way as a reference. Bits per weight
and file size are read back from the written file. Writes `docs/results/deploy.md`.

    python scripts/deploy_check.py                      # both shipped configs
    python scripts/deploy_check.py --only stories260k   # one of them

Needs `pip install -e ".[llamacpp]"`. Studies go to `runs/deploy/deploy.db`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import gguf
import optuna
import torch
from experiment_h1 import fresh_launch  # scripts/ is on the path when this file runs

from qopt import study as qstudy
from qopt.engine import llamacpp_perplexity
from qopt.gguf_source import is_gguf
from qopt.measure import Source, export_gguf_file

ROOT = Path(__file__).resolve().parents[1]
RUNS = [
    # (name, config, trials, max bpw)
    ("stories260k", ROOT / "studies" / "stories260k-llamacpp.yaml", 200, 7.5),
    ("smollm2-135m", ROOT / "studies" / "smollm2-135m-llamacpp.yaml", 24, 4.6),
]


def file_bpw(path: Path) -> tuple[float, dict[str, int]]:
    """Bits per weight of the file's block matrices (blk.*, 2-D), and how many of each type."""
    reader = gguf.GGUFReader(str(path))
    bits, weights, types = 0, 0, {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bits += 8 * int(t.n_bytes)
            weights += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return bits / weights, types


def check(name: str, config_path: Path, trials: int, max_bpw: float, url: str, out: Path) -> dict:
    config = qstudy.StudyConfig.load(config_path)
    study_name = f"deploy-{name}"
    search_s = fresh_launch(config, study_name, url, trials)
    trial, strategy = qstudy.best(study_name, max_bpw, url, candidates=5)
    path = out / f"{name}-best.gguf"
    export_gguf_file(path, strategy, Source(config.model, config.data, config.eval), force=True)
    bpw, types = file_bpw(path)
    run = qstudy.SearchRun(dataclasses.replace(config, device="cpu"))
    windows = run.evaluator.split.eval
    measured = run.evaluator.evaluate(strategy, "eval")
    engine = llamacpp_perplexity(path, windows)
    row = {
        "model": name,
        "trial": trial.number,
        "qopt_bpw": measured.bpw,
        "file_bpw": bpw,
        "types": types,
        "file_mib": path.stat().st_size / 2**20,
        "qopt_ppl": measured.ppl,
        "engine_ppl": engine,
        "fp_ppl": measured.fp_ppl,
        "windows": tuple(windows.shape),
        "search_s": search_s,
    }
    if is_gguf(config.model):  # the source file itself, in the engine: the harness's own agreement
        row["source_engine_ppl"] = llamacpp_perplexity(config.model, windows)
    print(row, flush=True)
    return row


def report(rows: list[dict], minutes: float, command: str) -> str:
    lines = [
        "# Served as measured: qopt's strategies in llama.cpp",
        "",
        f"`{command}` — {minutes:.0f} min on {torch.get_num_threads()} CPU thread(s). Each study searches only "
        "what GGUF stores exactly (`search.deploy: llamacpp`); its best strategy under the bpw (`qopt study "
        "best`, validation re-ranking) is written by `qopt export --format gguf` with qopt's own codes and "
        "scales, then run by llama.cpp (llama-cpp-python) on the study's held-out windows. qopt's perplexity "
        "is its own fake-quantized PyTorch evaluation on the same windows; bits per weight and size are "
        "read back from the file (block matrices, blk.*).",
        "",
        "| model | trial | bpw (qopt) | bpw (file) | tensor types | file MiB | windows x tokens | "
        "ppl qopt | ppl llama.cpp | difference | unquantized ppl (qopt / llama.cpp) |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        types = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items()))
        source = (
            f"{r['fp_ppl']:.3f} / {r['source_engine_ppl']:.3f}"
            if "source_engine_ppl" in r
            else f"{r['fp_ppl']:.3f} / –"
        )
        lines.append(
            f"| {r['model']} | {r['trial']} | {r['qopt_bpw']:.3f} | {r['file_bpw']:.3f} | {types} | "
            f"{r['file_mib']:.2f} | {r['windows'][0]} x {r['windows'][1]} | {r['qopt_ppl']:.3f} | "
            f"{r['engine_ppl']:.3f} | {r['engine_ppl'] / r['qopt_ppl'] - 1:+.2%} | {source} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=[r[0] for r in RUNS], help="check one model only")
    args = parser.parse_args()
    out = ROOT / "runs" / "deploy"
    out.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{out / 'deploy.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    rows = [check(n, c, t, b, url, out) for n, c, t, b in RUNS if args.only in (None, n)]
    minutes = (time.perf_counter() - started) / 60
    command = " ".join(["python scripts/deploy_check.py", *sys.argv[1:]])
    target = ROOT / "docs" / "results" / "deploy.md"
    target.write_text(report(rows, minutes, command))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
