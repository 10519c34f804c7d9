"""Stage 9: the experiment's report. Accuracy on every benchmark and measured
cost of every model, the cost of every stage from Snakemake's benchmark files
(device-hours = wall seconds x devices / 3600), the OPD training curves, and
the resolved config. Tables are written as markdown, CSV and HTML (the HTML
ones and the plots are what `snakemake --report` embeds).

The manifest (JSON, written by the report rule) lists the models with their
evaluation summaries per benchmark and the benchmark files of the stages that
made them. Beside the stage costs, the token budget: per OPD run, the mean
tokens (and response tokens) of an optimiser step of each method, from the
trainers' logs."""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from lightning_opd.artifacts import atomic_path
from lightning_opd.provenance import read_model_provenance, read_train_log


def benchmark_seconds(path: Path | str) -> float:
    """Wall-clock seconds of a job from its Snakemake benchmark file (mean over repeats)."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path}: not a readable Snakemake benchmark file ({error})") from None
    if "s" not in frame.columns or frame.empty:
        raise ValueError(f"{path}: no 's' (wall seconds) column; not a Snakemake benchmark file")
    return float(frame["s"].mean())


def held_devices(benchmark: Path, configured: int) -> int:
    """The devices a job held when it ran: the count its command wrote beside its benchmark file
    (``<job>.devices``; a later change of the config's resources, or ``--cores`` lowering a job's
    threads, does not reprice it), else the config's for a job that wrote none."""
    try:
        held = int(benchmark.with_suffix(".devices").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return configured
    return held if held > 0 else configured


def stage_costs(stages: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for entry in stages:
        path = Path(entry["benchmark"])
        if not path.is_file():  # a model given by path has no cost entries: a missing file is a lost measurement
            raise ValueError(f"{path}: the benchmark file of stage {entry['stage']} ({entry.get('job', path.stem)}) "
                             "is missing, so its cost is unknown; rerun that job (snakemake --forcerun) "
                             "to measure it again")
        seconds = benchmark_seconds(path)
        devices = held_devices(path, entry["devices"])
        rows.append({"stage": entry["stage"], "job": entry.get("job", path.stem), "wall_s": round(seconds, 2),
                     "devices": devices,
                     # a share of a job's rows costs that share (the rows a multi-round run's round 1 uses)
                     "device_hours": seconds * devices * entry.get("share", 1) / 3600})
    return pd.DataFrame(rows, columns=["stage", "job", "wall_s", "devices", "device_hours"])


def accuracy_column(benchmark: str, k: int) -> str:
    return f"{benchmark} avg@{k}"


def variant_name(model: dict[str, Any]) -> str:
    """A Lightning OPD variant as the report names it: its name and the fields it changes."""
    if not model.get("variant"):
        return ""
    changes = ", ".join(f"{key} {value}" for key, value in model.get("variant_fields", {}).items())
    return f"{model['variant']}: {changes}" if changes else model["variant"]


def trained_on_label(provenance: dict[str, Any]) -> str:
    """Where a model's training ended, e.g. ``cpu AVX512: <CPU name> (family 6 model 207) x 1`` or
    ``cuda: NVIDIA H100 80GB HBM3 x 8`` (processes over all nodes), with the variables that held the CPU
    kernels to an instruction set; empty for a model not trained by the pipeline or trained before it
    recorded this."""
    where = provenance.get("trained_on")
    if not where:
        return ""
    if where["device"] == "cpu":
        model = f" ({where['cpu']['model']})" if where["cpu"]["model"] else ""
        label = f"cpu {where['cpu_capability']}: {where['device_name']}{model} x {where['processes']}"
    else:
        label = f"{where['device']}: {where['device_name']} x {where['processes']}"
    held = " ".join(f"{name}={value}" for name, value in where["kernel_env"].items())
    return f"{label} [{held}]" if held else label


def model_table(manifest: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for model in manifest["models"]:
        costs = stage_costs(model["cost"])
        provenance = read_model_provenance(model["model_dir"]) if model.get("model_dir") else {}
        row = {
            "model": model["label"],
            "role": model["role"],
            "teacher": model.get("teacher", ""),
            "sft_teacher": model.get("sft_teacher", ""),
            "opd_teacher": model.get("opd_teacher", ""),
            "teacher_consistent": {True: "yes", False: "no"}.get(provenance.get("teacher_consistent"), ""),
            "seed": model.get("seed", ""),
            "variant": variant_name(model),
            # who sampled the live student of standard OPD (runs before the vllm sampler existed used hf)
            "sampler": provenance.get("sampler", "hf") if model["role"] == "standard_opd" else "",
            "trained_on": trained_on_label(provenance),
        }
        for benchmark, path in model["evals"].items():
            summary = json.loads(Path(path).read_text())
            row[accuracy_column(benchmark, summary["k"])] = round(summary["avg_at_k"], 4)
            row[f"{benchmark} pass@{summary['k']}"] = round(summary["pass_at_k"], 4)
            row[f"{benchmark} n_problems"] = summary["n_problems"]
        row["device_hours"] = round(costs["device_hours"].sum(), 5)
        row["drift_kl_ref"] = final_drift(model["model_dir"]) if model.get("model_dir") else None
        row["cost_stages"] = " + ".join(f"{s} {h:.5f}" for s, h in zip(costs["stage"], costs["device_hours"]))
        rows.append(row)
    return pd.DataFrame(rows)


def final_drift(model_dir: Path | str) -> float | None:
    """KL(pi_theta || pi_ref) on the held-out drift prompts at the end of training (None: not logged)."""
    drifts = [e["drift_kl_ref"] for e in read_train_log(model_dir) if "drift_kl_ref" in e]
    return round(drifts[-1], 5) if drifts else None


def tokens_per_step(model_dir: Path | str) -> dict[str, float]:
    """Mean tokens and response tokens of an optimiser step, and the steps, from
    an OPD model's training log (each log holds the mean over the steps it covers)."""
    entries = [e for e in read_train_log(model_dir) if "tokens_per_step" in e]
    if not entries:
        raise ValueError(f"{model_dir}: the training log has no tokens_per_step; not an OPD model of this pipeline")
    # logged_steps: what the log covers (a resumed run's first log starts at its checkpoint); older logs lack it
    steps = [e.get("logged_steps", e["step"] - before)
             for e, before in zip(entries, [0] + [e["step"] for e in entries[:-1]])]
    total = sum(steps)
    return {"tokens": sum(e["tokens_per_step"] * n for e, n in zip(entries, steps)) / total,
            "response_tokens": sum(e["response_tokens_per_step"] * n for e, n in zip(entries, steps)) / total,
            "steps": entries[-1]["step"]}


OPD_METHODS = {"lightning_opd": "Lightning OPD", "standard_opd": "standard OPD"}


def token_budget(manifest: dict[str, Any], models: pd.DataFrame) -> pd.DataFrame:
    """One row per OPD run (SFT teacher, OPD teacher, seed): both methods' mean
    tokens and response tokens per optimiser step side by side, their steps and
    the device-hours of their stages."""
    runs: dict[tuple, dict[str, Any]] = {}
    for model, hours in zip(manifest["models"], models["device_hours"]):
        if model["role"] not in OPD_METHODS or model.get("variant"):
            continue
        row = runs.setdefault((model["sft_teacher"], model["opd_teacher"], model["seed"]), {
            "sft_teacher": model["sft_teacher"], "opd_teacher": model["opd_teacher"], "seed": model["seed"]})
        budget = tokens_per_step(model["model_dir"])
        name = OPD_METHODS[model["role"]]
        row[f"{name} tokens/step"] = round(budget["tokens"], 1)
        row[f"{name} response tokens/step"] = round(budget["response_tokens"], 1)
        row[f"{name} steps"] = budget["steps"]
        row[f"{name} device_hours"] = hours
    columns = ["sft_teacher", "opd_teacher", "seed"] + [
        f"{name} {what}" for what in ("tokens/step", "response tokens/step", "steps", "device_hours")
        for name in OPD_METHODS.values()]
    table = pd.DataFrame(list(runs.values())).reindex(columns=columns)
    lightning, standard = (table[f"{name} tokens/step"] for name in OPD_METHODS.values())
    table["standard / Lightning tokens per step"] = (standard / lightning).round(3)
    return table


ROLE_ORDER = ["teacher", "student_base", "sft", "standard_opd", "lightning_opd"]
ROLE_NAMES = {"teacher": "teacher", "student_base": "student base", "sft": "SFT (pi_ref)",
              "standard_opd": "standard OPD", "lightning_opd": "Lightning OPD"}


def summary_table(models: pd.DataFrame, benchmarks: list[str], k: int) -> pd.DataFrame:
    """The paper's table: one row per method and teacher pair, accuracy on every
    benchmark as mean +- std over seeds, device-hours, and the cost ratio to standard OPD."""
    accs = [accuracy_column(b, k) for b in benchmarks]
    models = models.assign(order=models["role"].map(ROLE_ORDER.index))
    for column in ("variant", "drift_kl_ref"):
        if column not in models:
            models = models.assign(**{column: "" if column == "variant" else None})
    keys = ["order", "role", "variant", "teacher", "sft_teacher", "opd_teacher", "teacher_consistent", "sampler"]
    grouped = models.groupby(keys, sort=True, dropna=False)
    aggregations = {f"{acc} {stat}": (acc, stat) for acc in accs for stat in ("mean", "std")}
    table = grouped.agg(**aggregations, seeds=(accs[0], "size"), device_hours=("device_hours", "mean"),
                        drift_kl_ref=("drift_kl_ref", "mean")).reset_index()
    standard = (table[table.role == "standard_opd"].groupby(["sft_teacher", "opd_teacher"])["device_hours"]
                .first())  # the first sampler's, should a config have both
    ratios = []
    for row in table.itertuples():
        base = standard.get((row.sft_teacher, row.opd_teacher))
        ratios.append(round(row.device_hours / base, 3) if base and row.role.endswith("_opd") else None)
    names = []
    for row in table.itertuples():
        name = ROLE_NAMES[row.role] + (f" {row.teacher}" if row.teacher else "")
        if row.sft_teacher or row.opd_teacher:
            name += (
                f" (SFT data: {row.sft_teacher}"
                + (f", OPD teacher: {row.opd_teacher}" if row.opd_teacher else "")
                + ")"
            )
        if row.teacher_consistent == "no":
            name += " INCONSISTENT"
        if row.sampler:
            name += f" [{row.sampler} sampler]"
        if row.variant:
            name += f" [{row.variant}]"
        names.append(name)
    out = {"model": names}
    for acc in accs:
        table[f"{acc} std"] = table[f"{acc} std"].fillna(0.0)  # one seed: no spread
        out[acc] = [f"{m:.4f} +- {sd:.4f}" for m, sd in zip(table[f"{acc} mean"], table[f"{acc} std"])]
    for acc in accs:
        out[f"{acc} mean"], out[f"{acc} std"] = table[f"{acc} mean"].round(4), table[f"{acc} std"].round(4)
    out.update(seeds=table.seeds, device_hours=table.device_hours.round(5), cost_vs_standard_opd=ratios,
               final_drift_kl_ref=table.drift_kl_ref.astype(float).round(5))
    return pd.DataFrame(out)


def cache_state(paths: list[str]) -> pd.DataFrame:
    """Per teacher cache: response tokens, top_k, and bytes per response token of its per-token values
    (ids and log-probs as stored: the state Lightning OPD keeps instead of a live teacher) and of the file."""
    import pyarrow.parquet as pq

    rows = []
    for path in map(Path, paths):
        if not path.is_file():
            continue
        meta = json.loads(pq.read_schema(path).metadata[b"lightning_opd"])
        columns = [c for c in ("response_ids", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")
                   if c in pq.read_schema(path).names]
        table = pq.read_table(path, columns=columns)
        tokens = max(1, len(table.column("response_ids").combine_chunks().flatten()))
        state = sum(table.column(c).combine_chunks().flatten().nbytes for c in columns)
        rows.append({"cache": path.stem, "response_tokens": tokens, "top_k": meta.get("top_k") or 0,
                     "logprobs": "float32" + (f" + top-k {meta['top_k_dtypes']['logprobs']}" if meta.get("top_k")
                                              else ""),
                     "state_bytes_per_token": round(state / tokens, 1),
                     "file_bytes_per_token": round(path.stat().st_size / tokens, 1)})
    return pd.DataFrame(rows, columns=["cache", "response_tokens", "top_k", "logprobs", "state_bytes_per_token",
                                       "file_bytes_per_token"])


def save_figure(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def distinct_colours(plt, n: int) -> tuple:
    """tab10 up to 10 lines (tab20 pairs a dark and a light shade of each hue), tab20 up to 20."""
    return plt.get_cmap("tab10" if n <= 10 else "tab20").colors


def plot_accuracy_vs_cost(models: pd.DataFrame, benchmark: str, k: int, kind: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = accuracy_column(benchmark, k)
    # the legend beside the axes (it hid points inside them), up to 20 distinct colours, a marker per
    # method and hollow markers for the inconsistent teacher pairs
    fig, axis = plt.subplots(figsize=(9, 4))
    opd = models[models.role.str.endswith("_opd")]
    groups = opd.groupby(["role", "variant", "sft_teacher", "opd_teacher"])
    colours = distinct_colours(plt, groups.ngroups)
    for index, ((role, variant, sft_t, opd_t), group) in enumerate(groups):
        colour = colours[index % len(colours)]
        # one seed has no spread: std() is NaN there, drawn as no error bar
        axis.errorbar(
            group.device_hours.mean(),
            group[acc].mean(),
            yerr=group[acc].std(ddof=1) if len(group) > 1 else 0.0,
            xerr=group.device_hours.std(ddof=1) if len(group) > 1 else 0.0,
            marker="s" if role == "standard_opd" else "o",
            color=colour,
            markerfacecolor=colour if sft_t == opd_t else "none",
            capsize=3,
            label=run_label(role, variant, sft_t, opd_t),
        )
    for value in models.loc[models.role == "sft", acc]:
        axis.axhline(value, ls="--", color="gray", lw=0.8)
    axis.set_xlabel(f"OPD stage cost ({kind}-hours)")
    axis.set_ylabel(acc)
    axis.set_title(f"{benchmark}: accuracy against cost (dashed: pi_ref)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    save_figure(fig, out)


def run_label(role: str, variant: str, sft_t: str, opd_t: str) -> str:
    return f"{ROLE_NAMES[role]}{f' [{variant}]' if variant else ''} SFT {sft_t} / OPD {opd_t}"


def training_points(manifest: dict[str, Any], keys: list[str]) -> pd.DataFrame:
    """Every logged value of ``keys`` of every OPD run: its run's label (method, variant and teacher pair,
    shared by its seeds), whether the pair is consistent, the seed, the step, the key and the value."""
    return pd.DataFrame(
        [
            {"run": run_label(m["role"], m.get("variant") or "", m["sft_teacher"], m["opd_teacher"]),
             "consistent": m["sft_teacher"] == m["opd_teacher"], "seed": m.get("seed"), "step": e["step"],
             "key": key, "value": e[key]}
            for m in manifest["models"] if m.get("model_dir")
            for e in read_train_log(m["model_dir"]) if "loss" in e and "reverse_kl" in e
            for key in keys if key in e
        ],
        columns=["run", "consistent", "seed", "step", "key", "value"],
    )


def plot_training_curves(manifest: dict[str, Any], out: Path) -> None:
    """One line per method, variant and teacher pair: the mean over its seeds at every logged step, with the
    band from the lowest to the highest seed (one line per run made 48 lines of 10 colours in the comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("advantage", "reward proxy: mean log pi_T - log pi_theta"),
        ("reverse_kl", "per-token reverse KL to teacher (train batch)"),
        ("drift_kl_ref", "drift: KL(pi_theta || pi_ref), held-out"),
        ("student_logprob", "student log-prob of its training tokens"),
    ]
    points = training_points(manifest, [key for key, _ in panels])
    runs = list(dict.fromkeys(points.run))
    rows = (len(runs) + 2) // 3
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4 + 0.2 * rows))
    colours = distinct_colours(plt, len(runs))
    for index, run in enumerate(runs):
        of_run = points[points.run == run]
        style = {"color": colours[index % len(colours)], "ls": "-" if of_run.consistent.iloc[0] else "--"}
        seeds = of_run.seed.nunique()
        for axis, (key, _) in zip(axes, panels):
            curve = of_run[of_run.key == key].groupby("step").value.agg(["mean", "min", "max"])
            axis.plot(curve.index, curve["mean"], marker=".", label=f"{run} ({seeds} seeds)" if seeds > 1 else run,
                      **style)
            if seeds > 1:
                axis.fill_between(curve.index, curve["min"], curve["max"], color=style["color"], alpha=0.15, lw=0)
    for axis, (key, title) in zip(axes, panels):
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        if key == "drift_kl_ref":  # inconsistent pairs drift ~100x further
            drift = points.value[points.key == key]
            if len(drift) and (drift > 0).all():
                axis.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{manifest['experiment']}: OPD training (mean over seeds, band: lowest to highest; "
                 "dashed: inconsistent teacher pair)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05 + 0.055 * rows, 1, 1))
    save_figure(fig, out)


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; font-size: 14px; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; }}
th {{ background: #f0f0f0; }}
td {{ text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
pre {{ background: #f7f7f7; padding: 1em; }}
</style></head>
<body><h2>{title}</h2>
{body}
</body></html>
"""


def html_page(title: str, body: str) -> str:
    return HTML_PAGE.format(title=html.escape(title), body=body)


def write_frame(frame: pd.DataFrame, out_dir: Path, name: str, title: str) -> None:
    """``name``.csv, .md and .html: the same table for scripts, for reading and for the HTML report."""
    with atomic_path(out_dir / f"{name}.csv") as tmp:
        frame.to_csv(tmp, index=False)
    # blank, not "nan" or "None", where a cell does not apply
    shown = frame.astype(object).where(frame.notna(), None)
    with atomic_path(out_dir / f"{name}.md") as tmp:
        tmp.write_text(f"## {title}\n\n{shown.to_markdown(index=False, missingval='')}\n")
    with atomic_path(out_dir / f"{name}.html") as tmp:
        tmp.write_text(html_page(title, frame.to_html(index=False, na_rep="", border=0)))


def write_config(config: dict[str, Any], out_dir: Path, experiment: str) -> None:
    """The resolved config (every --configfile merged over the default): as YAML, reusable with
    --configfile, and as an HTML page for the report."""
    import yaml

    text = yaml.safe_dump(config, sort_keys=False, width=110)
    with atomic_path(out_dir / "config.yaml") as tmp:
        tmp.write_text(text)
    with atomic_path(out_dir / "config.html") as tmp:
        tmp.write_text(html_page(f"{experiment}: the resolved config", f"<pre>{html.escape(text)}</pre>"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True,
                        help="JSON: models, their evals and cost stages; - reads it from stdin (a manifest of many "
                             "runs passes Linux's 128 KiB limit on one command-line argument)")
    parser.add_argument("--config", required=True, help="JSON: the resolved pipeline config, written beside the tables")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        manifest = json.loads(sys.stdin.read() if args.manifest == "-" else args.manifest)
    except json.JSONDecodeError as error:
        parser.error(f"--manifest{' (stdin)' if args.manifest == '-' else ''}: not valid JSON ({error})")
    experiment = manifest["experiment"]
    kind = "GPU" if manifest["device_kind"] == "gpu" else "CPU core"
    k, benchmarks = manifest["eval"]["k"], manifest["eval"]["benchmarks"]
    # every table before any file: a missing benchmark file or training log leaves no half-written report
    models = model_table(manifest)
    table = summary_table(models, benchmarks, k)
    stages, budget = stage_costs(manifest["stages"]), token_budget(manifest, models)
    caches = cache_state(manifest.get("caches", []))
    with atomic_path(args.out_dir / "models.csv") as tmp:
        models.to_csv(tmp, index=False)
    write_frame(
        table,
        args.out_dir,
        "table",
        f"{experiment}: avg@{k} on {', '.join(benchmarks)} (mean +- std over seeds) and measured cost ({kind}-hours)",
    )
    plot_accuracy_vs_cost(models, benchmarks[0], k, kind, args.out_dir / "accuracy_vs_cost.png")
    write_frame(stages, args.out_dir, "stage_costs", f"{experiment}: cost of every stage ({kind}-hours)")
    write_frame(
        budget,
        args.out_dir,
        "token_budget",
        f"{experiment}: tokens per optimiser step of each OPD method (mean over the run) and the cost of its "
        f"stages ({kind}-hours)",
    )
    write_frame(caches, args.out_dir, "cache_state",
                f"{experiment}: teacher caches, bytes per response token (token id and log-probs as stored)")
    plot_training_curves(manifest, args.out_dir / "opd_training_curve.png")
    write_config(json.loads(args.config), args.out_dir, experiment)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
