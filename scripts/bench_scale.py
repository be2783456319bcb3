"""How qopt's cost grows with the model: load time, one trial's time and peak memory.

For stories260K, SmolLM2-135M (the shared GGUF) and randomly initialised
Llama-shaped models of about 360M (SmolLM2-360M's shape) and 1.1B parameters
(TinyLlama's shape), each in its own process (so peak RSS is that model's):

- load: seconds to load the model (a converted GGUF from qopt's cache; random
  models from their config);
- reference: seconds and bytes of the unquantized reference on the search part;
- RTN trial: one study trial's evaluation of uniform int4 g128 (g64 on stories260K; quantize all
  block linear layers, score the search part), seconds, and the same per
  million (parameters x tokens);
- calibration: seconds to collect every layer's Hessian, the bytes on disk,
  and the most Hessian bytes held at once (`calib_memory_mib`);
- GPTQ trial: uniform int4 g128 with GPTQ rounding, seconds (quantization part);
- peak RSS of the process, GiB.

    python scripts/bench_scale.py [--only NAME ...] [--tokens 2048] [--dtype float32] [-o docs/results/scale.md]

Random models score random token ids; their KL means nothing, their cost does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
SUBJECTS = {
    "stories260K": {"path": ASSETS / "models" / "stories260K" / "hf"},
    "SmolLM2-135M": {"path": ASSETS / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "Llama-360M (random)": {
        "config": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                       num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    },
    "Llama-1.1B (random)": {
        "config": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    },
}  # fmt: skip


def measure(name: str, n_tokens: int, dtype_name: str, with_gptq: bool = True) -> dict:
    """Run every measurement for one subject in this process."""
    import transformers

    from qopt.baselines import fitting_group_size
    from qopt.data import TokenSplit
    from qopt.evaluate import EvalSettings, Evaluator
    from qopt.model import load_model, parse_dtype, wrap_model
    from qopt.strategy import uniform

    dtype = parse_dtype(dtype_name)
    subject = SUBJECTS[name]
    start = time.perf_counter()
    if "path" in subject:
        lm = load_model(str(subject["path"]), device="cpu", dtype=dtype)
    else:
        config = transformers.LlamaConfig(max_position_embeddings=2048, **subject["config"])
        torch.manual_seed(0)
        lm = wrap_model(transformers.AutoModelForCausalLM.from_config(config, dtype=dtype), None, name)
    load_s = time.perf_counter() - start
    seq_len = min(512, lm.context_length)
    n_windows = max(1, n_tokens // seq_len)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2 * n_windows, seq_len), generator=torch.Generator().manual_seed(0))
    split = TokenSplit(search=ids[:n_windows], eval=ids[n_windows:])
    settings = EvalSettings(
        seq_len=seq_len, search_windows=n_windows, calib_windows=n_windows, batch_size=4, screen_windows=1
    )
    evaluator = Evaluator(lm, split, settings)
    start = time.perf_counter()
    reference = evaluator.reference("search")
    reference_s = time.perf_counter() - start
    group = fitting_group_size(lm.units)  # 128, or 64 for stories260K's 64-wide layers
    rtn = evaluator.evaluate(uniform(4, group_size=group), "search")
    start = time.perf_counter()
    stats = evaluator.quantizer.activation_stats(hessians=True)
    calib_s = time.perf_counter() - start
    calib_bytes = sum(f.stat().st_size for f in Path(stats.hessian.folder).glob("hessian-*"))
    gptq = evaluator.evaluate(uniform(4, group_size=group, rounding="gptq"), "search") if with_gptq else None
    params = sum(u.out_features * u.in_features for u in lm.units)
    return {
        "model": name,
        "params_m": sum(p.numel() for p in lm.model.parameters()) / 1e6,
        "tokens": split.search.numel(),
        "load_s": load_s,
        "reference_s": reference_s,
        "reference_mib": reference.nbytes / 2**20,
        "rtn_s": rtn.seconds,
        "rtn_us_per_mparam_token": rtn.seconds / (params / 1e6 * split.search.numel()) * 1e6,
        "calib_s": calib_s,
        "calib_disk_mib": calib_bytes / 2**20,
        "calib_peak_mib": stats.peak_hessian_bytes / 2**20,
        "gptq_quantize_s": gptq.quantize_seconds if gptq else float("nan"),
        "gptq_s": gptq.seconds if gptq else float("nan"),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def table(rows: list[dict], dtype: str, tokens: int) -> str:
    lines = [
        f"Measured by `python scripts/bench_scale.py --tokens {tokens} --dtype {dtype}` on 2 CPU cores, "
        f"{torch.get_num_threads()} torch threads; one process per model.",
        "",
        "| model | params (M) | load s | reference s / MiB | RTN trial s | µs per (M params x token) | "
        "Hessians s / on disk MiB / held MiB | GPTQ quantize s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f} | {r['load_s']:.1f} | {r['reference_s']:.1f} / "
            f"{r['reference_mib']:.1f} | {r['rtn_s']:.1f} | {r['rtn_us_per_mparam_token']:.3f} | "
            f"{r['calib_s']:.1f} / {r['calib_disk_mib']:.0f} / {r['calib_peak_mib']:.0f} | "
            f"{_seconds(r['gptq_quantize_s'])} | {r['peak_rss_gib']:.2f} |"
        )
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return "skipped" if value != value else f"{value:.1f}"  # NaN: not measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(SUBJECTS), help="models to measure (default: all)")
    parser.add_argument("--tokens", type=int, default=2048, help="search tokens scored per trial")
    parser.add_argument("--dtype", default="float32", help="float32 (fast on CPUs) or bfloat16")
    parser.add_argument("--output", "-o", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--no-gptq", action="store_true", help="skip the GPTQ trial (minutes on a 1B model)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.dtype, not args.no_gptq)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as cache:  # Hessians of random models are not worth keeping
        for name in args.only or SUBJECTS:
            env = dict(os.environ)
            if "random" in name:
                env["QOPT_CACHE_DIR"] = cache
            command = [sys.executable, __file__, "--child", name, "--tokens", str(args.tokens), "--dtype", args.dtype]
            command += ["--no-gptq"] if args.no_gptq else []
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows, args.dtype, args.tokens)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
