"""The `qopt` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from qopt.errors import QoptError
from qopt.strategy import FORMAT_BITS, GRANULARITIES, SCALE_RULES, WEIGHT_FORMATS, Strategy, uniform

app = typer.Typer(
    help="Search for quantization strategies of causal LMs, and measure them in true bits per weight.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold database URLs with passwords
)
strategy_app = typer.Typer(help="Write, check and inspect strategy files.", no_args_is_help=True)
app.add_typer(strategy_app, name="strategy")
study_app = typer.Typer(help="Create, run and read NSGA-II searches stored in an Optuna storage.", no_args_is_help=True)
app.add_typer(study_app, name="study")
baseline_app = typer.Typer(help="Measure human-designed schemes (RTN, GPTQ, AWQ, HQQ, ...) in qopt's harness.")
app.add_typer(baseline_app, name="baseline")

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hugging Face hub name, local model directory, or .gguf file.")
]
DataOpt = Annotated[
    str, typer.Option("--data", "-d", help="Text file, JSON list of strings, or hf:NAME[:CONFIG[:SPLIT]].")
]
DeviceOpt = Annotated[str | None, typer.Option(help="torch device; default: cuda when available, else cpu.")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="Weights held and computed in float32, bfloat16 or float16 (bfloat16 halves memory; "
        "float32 is faster on CPUs without bf16 arithmetic)."
    ),
]
StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="SQLAlchemy URL of the Optuna storage; default: $QOPT_STORAGE, else sqlite:///runs/qopt.db.",
        show_default=False,
    ),
]
CandidatesOpt = Annotated[
    int,
    typer.Option(
        help="With a bpw: how many of the best trials by search-part quality to compare on the validation part "
        "(1: the best by search-part quality alone)."
    ),
]
NameArg = Annotated[str, typer.Argument(help="Study name.")]
SeqLenOpt = Annotated[int | None, typer.Option(help="Tokens per window (capped by the model's context); default 512.")]
BatchSizeOpt = Annotated[int | None, typer.Option(help="Windows per forward pass; default 8.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@strategy_app.command("preset")
def strategy_preset(
    preset: Annotated[str, typer.Argument(help="uniform (one config on every block layer) or fp16 (unquantized).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (.yaml or .json); default: stdout.")
    ] = None,
    bits: Annotated[int, typer.Option(help="Weight bits: 2, 3, 4, 5, 6 or 8.")] = 4,
    group: Annotated[int, typer.Option(help="Group size (16-256), with --granularity group.")] = 128,
    granularity: Annotated[str, typer.Option(help=f"One of {', '.join(GRANULARITIES)}.")] = "group",
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric grid (no zero point).")] = False,
    format: Annotated[str, typer.Option("--format", help=f"Weight format: {', '.join(WEIGHT_FORMATS)}.")] = "int",
    scale: Annotated[str, typer.Option(help=f"Scale choice: {', '.join(SCALE_RULES)}.")] = "absmax",
) -> None:
    """Write a ready-made strategy: `uniform` (e.g. 4-bit, group 128) or `fp16`."""
    if preset == "fp16":
        strategy = Strategy(name="fp16")
    elif preset == "uniform":
        if bits not in FORMAT_BITS.get(format, ()) or bits == 16:
            raise QoptError(f"--bits {bits} is not available for --format {format}")
        strategy = uniform(bits, format=format, granularity=granularity, group_size=group, symmetric=sym, scale=scale)
    else:
        raise QoptError(f"unknown preset {preset!r} (presets: uniform, fp16)")
    if output is None:
        typer.echo(yaml.safe_dump(strategy.to_dict(), sort_keys=False), nl=False)
    else:
        strategy.save(output)
        typer.echo(f"wrote {output} ({strategy.name})")


@strategy_app.command("show")
def strategy_show(
    path: Annotated[Path, typer.Argument(help="Strategy file (.yaml or .json).")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Check against this model and show per-layer bits.")
    ] = None,
) -> None:
    """Validate a strategy file; with --model, list every layer's config and true bits."""
    strategy = Strategy.load(path)
    if model is None:
        typer.echo(yaml.safe_dump(strategy.to_dict(), sort_keys=False), nl=False)
        return
    from qopt.bits import layer_cost
    from qopt.model import load_model
    from qopt.quantizer import Quantizer

    lm = load_model(model, device="cpu")
    quantizer = Quantizer(lm)
    plan = quantizer.plan(strategy)
    width = max(len(u.name) for u in lm.units)
    for unit in lm.units:
        config = plan[unit.name]
        cost = layer_cost(unit.out_features, unit.in_features, config)
        shape = f"{unit.out_features}x{unit.in_features}"
        typer.echo(f"{unit.name:<{width}}  {unit.role:<7} {shape:>10}  {cost.bpw:6.3f} bpw  {config.describe()}")
    total = quantizer.cost(strategy)
    typer.echo(
        f"blocks {total.bpw:.3f} bpw, embed {total.embed.bpw:.3f} bpw, head {_head_label(total.head.bpw)}, "
        f"{total.total_bytes / 2**20:.2f} MiB in all"
    )


def _note(message: str) -> None:
    """Tell the user something on stderr (e.g. that a GGUF model's weights were already quantized)."""
    typer.echo(f"note: {message}", err=True)


def _head_label(head_bpw: float) -> str:
    return f"{head_bpw:.3f} bpw" if head_bpw else "tied to embed"


@app.command("eval")
def eval_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Hub name, local model directory or .gguf file (default with --checkpoint: its source).",
        ),
    ] = None,
    strategy: Annotated[Path | None, typer.Option("--strategy", "-s", help="Strategy file (.yaml or .json).")] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", "-c", help="A directory written by `qopt export`: measure its packed weights."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Text file, JSON list of strings, or hf:NAME[:CONFIG[:SPLIT]] (default with -c: its source).",
        ),
    ] = None,
    part: Annotated[
        str,
        typer.Option(help="search (what the search optimises on), validation (spare search-half windows) or eval."),
    ] = "eval",
    windows: Annotated[
        int | None, typer.Option(help="Windows of that part to use (default: 16 search, 64 eval).")
    ] = None,
    seq_len: SeqLenOpt = None,
    batch_size: BatchSizeOpt = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for window sampling and stochastic rounding; default 0.")
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Quantize MODEL as a strategy says (or load an exported checkpoint) and measure KL,
    perplexity, top-1 and true bpw against the unquantized model.

    With --checkpoint, model, data and settings default to the export's: its metrics are reproduced.
    """
    from qopt.measure import measure

    overrides = {"seq_len": seq_len, "batch_size": batch_size, "seed": seed}
    if windows is not None:
        overrides["search_windows" if part == "search" else "eval_windows"] = windows
    result = measure(
        part=part,
        model=model,
        data=data,
        strategy=strategy,
        checkpoint=checkpoint,
        overrides=overrides,
        device=device,
        dtype=dtype,
        on_note=_note,
    )
    metrics, n_windows = result.metrics, result.n_windows
    if as_json:
        typer.echo(json.dumps(metrics.to_dict()))
        return
    rows = [
        ("model", result.model),
        ("strategy", f"{result.label} ({result.strategy.name or 'unnamed'})"),
        ("part", f"{part}: {n_windows} windows x {metrics.tokens // n_windows} tokens = {metrics.tokens} tokens"),
        ("bpw", f"{metrics.bpw:.3f} (block linear layers)"),
        ("edges", f"embed {metrics.embed_bpw:.3f} bpw, head {_head_label(metrics.head_bpw)}"),
        ("size", f"{metrics.total_bytes / 2**20:.3f} MiB"),
        ("KL", f"{metrics.kl:.5f} nats/token"),
        (
            "perplexity",
            f"{metrics.ppl:.3f} (unquantized {metrics.fp_ppl:.3f}, {metrics.ppl / metrics.fp_ppl - 1:+.2%})",
        ),
        ("top-1", f"{metrics.top1:.2%} agreement"),
        ("time", f"{metrics.seconds:.2f} s on {result.device}"),
    ]
    for row_label, value in rows:
        typer.echo(f"{row_label:<11}{value}")


@app.command("export")
def export_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write.")],
    name: Annotated[str | None, typer.Argument(help="Study name (with --trial).", show_default=False)] = None,
    trial: Annotated[int | None, typer.Option("--trial", "-t", help="Trial number in the study.")] = None,
    max_bpw: Annotated[
        float | None, typer.Option(help="Instead of --trial: the study's best trial at or under this bpw.")
    ] = None,
    strategy: Annotated[
        Path | None, typer.Option("--strategy", "-s", help="Or: a strategy file (with --model).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model for --strategy.")] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="Calibration text for --strategy (needed by GPTQ, AWQ, smoothing)."),
    ] = None,
    storage: StorageOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    candidates: CandidatesOpt = 5,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="qopt: a packed checkpoint folder; gguf: one .gguf file for llama.cpp holding qopt's own codes "
            "(int4/int5 g32 either way, int8 g32 symmetric, 16-bit); compressed-tensors: a folder vLLM and "
            "transformers load (INT 2-8 bits, tensor/channel/group scales). What a format cannot hold is refused.",
        ),
    ] = "qopt",
    nearest: Annotated[
        bool,
        typer.Option(
            help="With --format gguf: store matrices no GGUF type holds exactly in the nearest type, re-rounded "
            "from their float weights (listed, and measured when there is text), instead of refusing."
        ),
    ] = False,
) -> None:
    """Write a strategy as a packed checkpoint: strategy.yaml, model.safetensors (codes
    bit-packed, fp16 scales/zeros/outliers), manifest.json, and llama-tensor-types.txt
    (a llama-quantize --tensor-type override list, with the genes llama.cpp cannot express).

    From a study, with its model, data and settings: qopt export NAME --trial T (or --max-bpw B) -o DIR.

    From a strategy file: qopt export --strategy FILE --model M [--data D] -o DIR.
    """
    from qopt.evaluate import EvalSettings
    from qopt.measure import Source, export

    if (name is None) == (strategy is None) or (name is not None and (trial is None) == (max_bpw is None)):
        raise QoptError("give a study NAME with --trial T or --max-bpw B, or --strategy FILE with --model M")
    if name is not None:
        from qopt import study

        if trial is None:
            assert max_bpw is not None
            trial = study.best(name, max_bpw, storage, candidates, progress=True)[0].number
        config, frozen, parsed = study.trial_strategy(name, trial, storage)
        model, data, settings = config.model, config.data, config.eval
        if frozen.state.name == "PRUNED":
            typer.echo(
                f"warning: trial {trial} was stopped early ({frozen.user_attrs.get('rejected', 'pruned')}); "
                "its quality was never measured in full",
                err=True,
            )
    else:
        assert strategy is not None
        if model is None:
            raise QoptError("--strategy needs --model")
        parsed, settings = Strategy.load(strategy), EvalSettings()
    source = Source(model, data, settings, device, dtype, _note)
    if format == "gguf":
        from qopt.measure import export_gguf_file

        summary = export_gguf_file(output, parsed, source, force=force, nearest=nearest)
        for line in summary["changed"]:
            typer.echo(f"changed: {line} (re-rounded from float weights)", err=True)
        if "measured" in summary:
            m = summary["measured"]
            typer.echo(
                f"held-out perplexity ({m['tokens']:,} tokens): strategy {m['strategy_ppl']:.4f}, "
                f"file {m['file_ppl']:.4f} ({m['file_ppl'] / m['strategy_ppl'] - 1:+.2%})",
                err=True,
            )
        types = ", ".join(f"{n} {t}" for t, n in sorted(summary["types"].items()))
        typer.echo(
            f"wrote {output}: {parsed.name or 'strategy'}, {summary['file_bytes']:,} bytes; block matrices "
            f"{summary['bpw']:.3f} bits per weight as stored ({types})"
        )
        return
    if format == "compressed-tensors":
        from qopt.measure import export_compressed_tensors_folder

        summary = export_compressed_tensors_folder(output, parsed, source, force=force)
        groups = ", ".join(f"{n} x {label}" for label, n in summary["groups"].items())
        typer.echo(f"wrote {output}: {parsed.name or 'strategy'}, {summary['file_bytes']:,} weight bytes ({groups})")
        return
    if format != "qopt":
        raise QoptError(f"--format must be qopt, gguf or compressed-tensors, got {format!r}")
    written = export(output, parsed, source, force=force)
    manifest = written.manifest
    counted, stored = manifest["quantized_counted_bytes"], manifest["quantized_stored_bytes"]
    typer.echo(f"wrote {output}: {parsed.name or 'strategy'} at {manifest['bpw']:.3f} bpw")
    typer.echo(
        f"quantized matrices: {stored:,} bytes stored, {counted:,} counted by true bpw "
        f"({stored / counted - 1:+.2%}); other parameters {manifest['plain_stored_bytes']:,} bytes "
        f"({manifest['plain_dtype']}); model.safetensors {manifest['file_bytes']:,} bytes"
    )
    typer.echo(
        f"llama-tensor-types.txt: {written.n_tensors} tensors, {written.n_lost} with genes llama.cpp cannot express"
    )


_ROT = {True: "yes", False: "no", None: "-"}  # the baseline table's rotation column


@baseline_app.command("run")
def baseline_run(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Hub name or local model directory (default: the study's).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="Text file, JSON list of strings, or hf:NAME (default: the study's)."),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated: rtn, gptq, awq, hqq, smoothquant, quarot (uniform schemes), and allocate "
            "(per-layer sensitivity-based allocation at each --budget)."
        ),
    ] = "rtn,gptq,awq,hqq,smoothquant,quarot",
    budget: Annotated[
        str | None,
        typer.Option(help="With --methods allocate: comma-separated budgets in true bits per weight, e.g. 3.25,4.25."),
    ] = None,
    proxy: Annotated[
        str,
        typer.Option(
            help="With --methods allocate: the per-layer quality proxy. kl: the KL with only that layer quantized, "
            "one evaluation per (layer, config); hessian: the layer's output error tr(dW H dW^T) scaled to KL by one "
            "evaluation per layer (for larger models)."
        ),
    ] = "kl",
    bits: Annotated[str, typer.Option(help="Comma-separated weight bit-widths (2-8).")] = "2,3,4,8",
    group: Annotated[
        str,
        typer.Option(
            help="Comma-separated group sizes (16-256), 0 for one scale per output channel; default: the largest "
            "of 128, 64, 32, 16 that fits the model's narrowest layer."
        ),
    ] = "auto",
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric INT grids (no zero points).")] = False,
    scale: Annotated[
        str,
        typer.Option(
            help="Comma-separated scale rules of the weight-only methods and the allocator's menu: absmax (the "
            "largest magnitude sets each block's scale), mse (a clip search minimising the weight's squared "
            "error, as GPTQ's reference quantizer and llama.cpp's k-quants do)."
        ),
    ] = "absmax",
    rotate: Annotated[
        bool,
        typer.Option(
            "--rotate/--no-rotate",
            help="Also measure each weight-only scheme after a Hadamard rotation of its layers' inputs "
            "(weight-only QuaRot / QuIP#), and give the allocator rotated configs to choose.",
        ),
    ] = False,
    windows: Annotated[
        int | None, typer.Option(help="Windows per part (search and held out); default 16 search, 64 held out.")
    ] = None,
    seq_len: SeqLenOpt = None,
    batch_size: BatchSizeOpt = None,
    calibration: Annotated[
        str | None,
        typer.Option(
            help="Where GPTQ/AWQ/SmoothQuant statistics come from: search (the first scored search windows; "
            "the default) or apart (search-half windows never scored, so search KL is not in-sample)."
        ),
    ] = None,
    dtype: DtypeOpt = "float32",
    study_name: Annotated[
        str | None,
        typer.Option(
            "--study",
            help="Measure with this study's model, data and split, and add each scheme its space can express "
            "to the study as a completed baseline trial (plotted, and a seed for the search).",
        ),
    ] = None,
    storage: StorageOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure human-designed schemes at several bit-widths: true bpw, KL on the search and
    held-out parts, perplexity, seconds. Calibration (GPTQ, AWQ, SmoothQuant) uses the search part only."""
    from qopt import baselines

    method_list, bit_list = _csv(methods, "--methods", str), _csv(bits, "--bits", int)
    variants = {"scales": _csv(scale, "--scale", str), "rotations": (False, True) if rotate else (False,)}
    if unknown := set(variants["scales"]) - set(baselines.SCHEME_SCALES):
        raise QoptError(f"--scale {sorted(unknown)[0]!r}: choose among {', '.join(baselines.SCHEME_SCALES)}")
    budgets = _csv(budget, "--budget", float) if budget is not None else []
    allocating = "allocate" in method_list
    method_list = [m for m in method_list if m != "allocate"]
    if allocating != bool(budgets):
        raise QoptError("--methods allocate needs --budget B[,B...], and --budget needs --methods allocate")
    from qopt.allocate import PROXIES

    if proxy not in PROXIES:
        raise QoptError(f"--proxy {proxy!r}: choose one of {', '.join(PROXIES)}")
    baselines.schemes(method_list, bit_list, group_size=None, **variants)  # bad input fails before loading
    groups = None if group == "auto" else [g or None for g in _csv(group, "--group", int)]
    overrides = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "search_windows": windows,
        "eval_windows": windows,
        "calibration": calibration,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if study_name is not None:
        from qopt import study

        _, config = study.load(study_name, storage)
        if model is not None or data is not None:
            raise QoptError("--study measures on the study's own model and data; drop --model and --data")
        if overrides:
            raise QoptError(
                "--study measures with the study's own evaluation settings; drop --windows/--seq-len/--calibration"
            )
        run = study.SearchRun(dataclasses.replace(config, device=device or config.device))
        evaluator = run.evaluator
    else:
        if model is None or data is None:
            raise QoptError("give --model and --data, or --study NAME")
        from qopt.evaluate import EvalSettings
        from qopt.measure import evaluator_for

        settings = EvalSettings(**overrides)
        evaluator = evaluator_for(model, data, settings, device, dtype, on_note=_note, progress=not as_json)
    if groups is None:
        groups = [baselines.fitting_group_size(evaluator.lm.units)]
        if not as_json:
            typer.echo(f"group size {groups[0]} (the largest of 128, 64, 32, 16 that fits every layer)", err=True)
    chosen: list = [
        s for g in groups for s in baselines.schemes(method_list, bit_list, group_size=g, symmetric=sym, **variants)
    ]
    if allocating:
        from qopt.allocate import allocate, measure_costs, menu, proxy_fit

        outliers = tuple("rotate" if r else "none" for r in variants["rotations"])
        configs = menu(groups[0], scales=variants["scales"], outliers=outliers)
        if study_name is not None:
            from qopt.study.allocation import space_menu

            configs = space_menu(run.space, configs)  # what the study's trials can hold
        costs = measure_costs(evaluator, configs, proxy=proxy, progress=not as_json)
        rho, pairs = proxy_fit(evaluator, costs, progress=not as_json)
        if not as_json:
            typer.echo(
                f"allocator: {len(costs.menu)} configs per layer; its additive {proxy} proxy ranks {len(pairs)} random "
                f"mixtures by search KL with Spearman rho {rho:.3f}",
                err=True,
            )
        chosen += [baselines.Allocation(b, allocate(costs, b)) for b in budgets]
    if not as_json:
        parts = evaluator.split
        typer.echo(
            f"{len(chosen)} schemes; calibration on {len(evaluator.calibration_windows)} search-half windows "
            f"({evaluator.settings.calibration}); search KL on {len(parts.search)} windows, "
            f"held out on {len(parts.eval)}, of {parts.eval.shape[1]} tokens each",
            err=True,
        )
    header = (
        f"{'method':<12}{'bits':>5} {'group':>6} {'scale':>6} {'rot':>4} {'bpw':>7} {'search KL':>10} "
        f"{'eval KL':>9} {'eval ppl':>9} {'quant s':>8} {'s':>6}"
    )
    if not as_json:
        typer.echo(header)
    results = []
    for result in baselines.run(evaluator, chosen):
        results.append(result)
        if not as_json:
            r = result.row()
            typer.echo(
                f"{r['method']:<12}{r['bits']:>5} {r['group']:>6} {r['scale']:>6} {_ROT[r['rotate']]:>4} "
                f"{r['bpw']:>7.3f} {r['search_kl']:>10.4f} {r['eval_kl']:>9.4f} {r['eval_ppl']:>9.3f} "
                f"{r['quantize_seconds']:>8.2f} {r['seconds']:>6.2f}"
            )
    rows = [r.row() for r in results]
    if study_name is not None:
        numbers = study.add_baselines(study_name, run, [(r.strategy, r.held_out) for r in results], storage)
        for row, number in zip(rows, numbers, strict=True):
            row["trial"] = number
        if not as_json:
            added = ", ".join(f"{r['name']} = trial {r['trial']}" for r in rows if r["trial"] is not None)
            missing = ", ".join(r["name"] for r in rows if r["trial"] is None)
            typer.echo(f"in study {study_name!r}: {added or 'none'}")
            if missing:
                typer.echo(f"not expressible in the study's search space: {missing}")
    if as_json:
        typer.echo(json.dumps(rows))


def _csv(value: str, option: str, kind: type) -> list:
    """A comma-separated option as a list of `kind`, with a one-line error naming the option."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        parsed = [kind(v) for v in items]
    except ValueError:
        raise QoptError(f"{option}: {value!r} is not a comma-separated list of {kind.__name__}s") from None
    if not parsed:
        raise QoptError(f"{option}: give at least one value")
    return parsed


@study_app.command("create")
def study_create(
    name: NameArg,
    config: Annotated[Path, typer.Option("--config", "-c", help="Study YAML (see studies/).")],
    storage: StorageOpt = None,
) -> None:
    """Create a study from a config (idempotent) and enqueue its baselines as the first trials."""
    from qopt import study
    from qopt.storage import redacted_url, storage_url

    created = study.create(name, study.StudyConfig.load(config), storage)
    typer.echo(f"study {name!r} ready in {redacted_url(storage_url(storage))}: {len(created.trials)} trials")


@study_app.command("launch")
def study_launch(
    name: NameArg,
    n_trials: Annotated[
        int | None, typer.Option(help="Trials to run in this launch, shared by the workers (added to those done).")
    ] = None,
    until: Annotated[
        int | None, typer.Option(help="Stop once the study has this many completed trials, whoever ran them.")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine (each loads the model once).")] = 1,
    heartbeat: Annotated[
        int, typer.Option(help="Seconds between a running trial's heartbeats; silent for 3 = failed and retried.")
    ] = 10,
    storage: StorageOpt = None,
) -> None:
    """Run NSGA-II trials; resumes where earlier launches stopped. Ctrl-C and SIGTERM stop cleanly.

    The same command on other machines, with the same --storage, joins the same study.
    """
    from optuna.trial import TrialState

    from qopt import study
    from qopt.storage import count_trials
    from qopt.study import check_launch, launch

    check_launch(n_trials, until, timeout, workers, heartbeat)
    if n_trials is None and timeout is None and until is None:
        raise QoptError("give --n-trials, --until or --timeout")
    handle, _ = study.load(name, storage)  # counts below are database counts: no trial is read
    try:
        ran = launch(name, n_trials, timeout, storage, workers=workers, until=until, heartbeat=heartbeat)
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: the study has {count_trials(handle, TrialState.COMPLETE)} completed trials; the running "
            "one was marked failed. Launch again to continue.",
            err=True,
        )
        raise typer.Exit(130) from None
    collapsed = ran.pruned - ran.screened
    typer.echo(
        f"{ran.finished} trials ran in this launch: {ran.completed} completed, {ran.screened} screened out and "
        f"{collapsed} collapsed after their first batch"
        + (f", {ran.failed} failed (their retries are among the others)" if ran.failed else "")
        + f". The study holds {count_trials(handle, TrialState.COMPLETE)} completed trials; see the front with "
        f"`qopt study front {name}`."
    )


@study_app.command("status")
def study_status(name: NameArg, storage: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """Trial counts by state, front size, generation and mean trial time."""
    from qopt import study

    info = study.status(name, storage)
    if as_json:
        typer.echo(json.dumps(info))
        return
    for key, value in info.items():
        typer.echo(f"{key:<20}{value}")


@study_app.command("front")
def study_front(name: NameArg, storage: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """The Pareto front (and baselines), with metrics on the held-out evaluation part."""
    from qopt import study

    members = study.front(name, storage, progress=not as_json)
    if as_json:
        typer.echo(json.dumps([m.__dict__ for m in members]))
        return
    typer.echo(f"{'trial':>6} {'bpw':>7} {'search KL':>10} {'eval KL':>9} {'eval ppl':>9} {'eval top1':>9}  baseline")
    for m in members:
        typer.echo(
            f"{m.trial:>6} {m.bpw:>7.3f} {m.search_kl:>10.4f} {m.eval_kl:>9.4f} {m.eval_ppl:>9.3f} "
            f"{m.eval_top1:>9.1%}  {m.baseline or ''}"
        )


@study_app.command("best")
def study_best(
    name: NameArg,
    max_bpw: Annotated[float, typer.Option(help="Largest acceptable true bits per weight.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Strategy file to write (.yaml or .json).")],
    storage: StorageOpt = None,
    candidates: CandidatesOpt = 5,
) -> None:
    """Write the best strategy at or under a bit budget: of the CANDIDATES best trials by
    search-part quality, the one with the least KL on the validation part (search-half text
    the search never scored), so a strategy that only fits the search windows is not chosen."""
    from qopt import study

    shortlist = study.shortlist(name, max_bpw, storage, candidates, progress=True)
    trial, strategy = study.best(name, max_bpw, storage, candidates)
    if len(shortlist) > 1:
        typer.echo(f"{'trial':>6} {'bpw':>7} {'search':>9} {'validation KL':>14}")
        for c in shortlist:
            shown = f"{c.validation_kl:.4f}" if c.validation_kl is not None else "-"
            mark = "  <- chosen" if c.trial == trial.number else ""
            typer.echo(f"{c.trial:>6} {c.bpw:>7.3f} {c.search:>9.4f} {shown:>14}{mark}")
    strategy.save(output)
    typer.echo(f"wrote {output}: trial {trial.number}, {trial.user_attrs['bpw']:.3f} bpw, search {trial.values[0]:.4f}")


@study_app.command("plot")
def study_plot(
    name: NameArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write.")] = Path("front.html"),
    storage: StorageOpt = None,
    held_out: Annotated[bool, typer.Option(help="Also evaluate the front on the evaluation part.")] = True,
) -> None:
    """A self-contained plotly HTML of the front, all trials, baselines, budget and fp16 reference."""
    from qopt import study
    from qopt.report import front_figure

    members = study.front(name, storage, progress=True) if held_out else []
    optuna_study, config = study.load(name, storage)
    try:
        front_figure(optuna_study, config, members).write_html(output, include_plotlyjs=True)
    except OSError as exc:
        raise QoptError(f"cannot write {output}: {exc.strerror}") from exc
    typer.echo(f"wrote {output}")


@study_app.command("report")
def study_report(
    name: NameArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write.")] = Path("report.html"),
    storage: StorageOpt = None,
    held_out: Annotated[bool, typer.Option(help="Also evaluate the front on the evaluation part.")] = True,
) -> None:
    """What structure the search found: a self-contained HTML report (front; per-layer bits,
    format, granularity, scale, outliers, rounding and activations across the front; gene
    frequencies on the front vs the population; protected layers; each member against the
    nearest baseline) and a short summary here."""
    from qopt import study
    from qopt.report import front_figure, structure_html
    from qopt.structure import summary

    members = study.front(name, storage, progress=True) if held_out else []
    optuna_study, config = study.load(name, storage)
    found = study.structure(name, storage)
    if not found.front:
        raise QoptError(f"study {name!r} has no searched strategy on its feasible front yet; launch it first")
    text = summary(found, config.objectives[0])
    page = structure_html(
        f"qopt study {name}", front_figure(optuna_study, config, members), found, text, config.objectives[0]
    )
    try:
        output.write_text(page)
    except OSError as exc:
        raise QoptError(f"cannot write {output}: {exc.strerror}") from exc
    typer.echo(text)
    typer.echo(f"wrote {output}")


@app.command("dashboard")
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
) -> None:
    """Serve optuna-dashboard on the study storage."""
    from qopt.storage import connect

    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise QoptError("optuna-dashboard is not installed: pip install 'qopt[dashboard]'") from None
    typer.echo(f"optuna-dashboard on http://{host}:{port} (Ctrl-C to stop)")
    run_server(connect(storage), host=host, port=port)


def main() -> None:
    """Entry point: user errors print one line and exit 2; bugs keep their traceback."""
    try:
        app()
    except QoptError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
