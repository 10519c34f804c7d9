"""The report turns Snakemake benchmark files into device-hours, evaluations
on several benchmarks into a column per benchmark, and the OPD trainers' logs
into both methods' tokens per optimiser step side by side."""
import json
import re
import shlex
import subprocess
import sys

import pandas as pd
import pytest
import torch

from lightning_opd.provenance import read_train_log
from lightning_opd.report import (
    benchmark_seconds,
    model_table,
    stage_costs,
    summary_table,
    token_budget,
    tokens_per_step,
    trained_on_label,
    training_points,
)

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def bench(path, *seconds):
    path.write_text(HEADER + "".join(f"{s}\t0:00:00\t1\t1\t1\t1\t0\t0\t100\t{s}\n" for s in seconds))
    return str(path)


def test_device_hours_are_wall_time_times_devices(tmp_path):
    stages = [
        {"stage": "rollouts", "benchmark": bench(tmp_path / "r.tsv", 3600.0), "devices": 8},
        {"stage": "teacher_cache", "benchmark": bench(tmp_path / "c.tsv", 900.0), "devices": 4},
        {"stage": "lightning_opd", "benchmark": bench(tmp_path / "l.tsv", 100.0, 300.0), "devices": 2},
    ]
    costs = stage_costs(stages)
    assert list(costs["stage"]) == ["rollouts", "teacher_cache", "lightning_opd"]
    assert costs["device_hours"].tolist() == pytest.approx([8.0, 1.0, 200.0 * 2 / 3600])
    assert costs["device_hours"].sum() == pytest.approx(9.0 + 400 / 3600)


def test_a_job_is_priced_at_the_devices_it_recorded_not_at_the_configs(tmp_path):
    """The job's command writes the devices it holds beside its benchmark file: a later change of the
    config's resources (or --cores lowering its threads) reprices nothing. A job that wrote none, or an
    unreadable count, falls back to the config's."""
    entry = {"stage": "rollouts", "benchmark": bench(tmp_path / "r.tsv", 3600.0), "devices": 8}
    (tmp_path / "r.devices").write_text("2\n")
    assert stage_costs([entry])[["devices", "device_hours"]].values.tolist() == [[2, 2.0]]
    (tmp_path / "r.devices").write_text("two\n")
    assert stage_costs([entry])[["devices", "device_hours"]].values.tolist() == [[8, 8.0]]


def test_a_missing_benchmark_file_is_an_error_not_a_free_stage(tmp_path):
    """A stage the manifest lists ran; without its benchmark file (deleted, or an output made by
    --touch) its cost would silently be 0 and every ratio to it wrong."""
    stages = [{"stage": "rollouts", "benchmark": bench(tmp_path / "r.tsv", 3600.0), "devices": 8},
              {"stage": "lightning_opd", "job": "sft-A_teacher-A_seed-0", "benchmark": str(tmp_path / "l.tsv"),
               "devices": 1}]
    match = r"l\.tsv: the benchmark file of stage lightning_opd \(sft-A_teacher-A_seed-0\) is missing"
    with pytest.raises(ValueError, match=match):
        stage_costs(stages)


def test_a_share_of_a_job_costs_that_share(tmp_path):
    entry = {"stage": "rollouts", "benchmark": bench(tmp_path / "r.tsv", 3600.0), "devices": 8}
    assert stage_costs([{**entry, "share": 0.25}])["device_hours"].tolist() == pytest.approx([2.0])
    assert stage_costs([entry])["device_hours"].tolist() == pytest.approx([8.0])


def test_variants_get_rows_of_their_own_named_by_their_changes(tmp_path):
    models = []
    for label, variant, fields, seed, acc in [("l-0", "", {}, 0, 0.5), ("l-1", "", {}, 1, 0.7),
                                              ("r-0", "rounds2", {"rounds": 2}, 0, 0.9)]:
        (tmp_path / f"{label}.json").write_text(json.dumps({"k": 4, "avg_at_k": acc, "pass_at_k": 1.0,
                                                            "n_problems": 10}))
        model_dir = tmp_path / label
        model_dir.mkdir()
        (model_dir / "train_log.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 0.1, "drift_kl_ref": d}) + "\n" for s, d in [(1, 0.01), (2, acc / 10)]))
        models.append({"label": label, "role": "lightning_opd", "variant": variant, "variant_fields": fields,
                       "sft_teacher": "A", "opd_teacher": "A", "seed": seed, "model_dir": str(model_dir),
                       "evals": {"t": str(tmp_path / f"{label}.json")},
                       "cost": [{"stage": "x", "benchmark": bench(tmp_path / f"{label}.tsv", 36.0), "devices": 1}]})
    table = summary_table(model_table({"models": models}), ["t"], 4)
    assert table["model"].tolist() == ["Lightning OPD (SFT data: A, OPD teacher: A)",
                                       "Lightning OPD (SFT data: A, OPD teacher: A) [rounds2: rounds 2]"]
    assert table["t avg@4 mean"].tolist() == [0.6, 0.9] and table["seeds"].tolist() == [2, 1]
    assert table["final_drift_kl_ref"].tolist() == pytest.approx([0.06, 0.09])  # the last drift, mean over seeds


def test_unreadable_benchmark_is_named(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("not\ta benchmark\n1\t2\n")
    with pytest.raises(ValueError, match="bad.tsv: no 's'"):
        benchmark_seconds(bad)


def test_a_column_per_benchmark_with_mean_and_std_over_seeds(tmp_path):
    accuracy = {("sft-A", "aime24"): 0.5, ("sft-A", "aime25"): 0.25,
                ("lightning-0", "aime24"): 0.6, ("lightning-0", "aime25"): 0.3,
                ("lightning-1", "aime24"): 0.8, ("lightning-1", "aime25"): 0.2}
    models = []
    for label, role, seed in [("sft-A", "sft", ""), ("lightning-0", "lightning_opd", 0),
                              ("lightning-1", "lightning_opd", 1)]:
        evals = {}
        for benchmark in ("aime24", "aime25"):
            evals[benchmark] = str(tmp_path / f"{benchmark}-{label}.json")
            (tmp_path / f"{benchmark}-{label}.json").write_text(json.dumps(
                {"k": 32, "avg_at_k": accuracy[label, benchmark], "pass_at_k": 1.0, "n_problems": 30}))
        models.append({"label": label, "role": role, "sft_teacher": "A", "opd_teacher": "" if role == "sft" else "A",
                       "seed": seed, "evals": evals,
                       "cost": [{"stage": "x", "benchmark": bench(tmp_path / f"{label}.tsv", 360.0), "devices": 8}]})
    frame = model_table({"models": models})
    assert frame["aime25 avg@32"].tolist() == [0.25, 0.3, 0.2] and frame["aime24 n_problems"].eq(30).all()
    table = summary_table(frame, ["aime24", "aime25"], 32)
    assert table.columns.tolist() == ["model", "aime24 avg@32", "aime25 avg@32", "aime24 avg@32 mean",
                                      "aime24 avg@32 std", "aime25 avg@32 mean", "aime25 avg@32 std", "seeds",
                                      "device_hours", "cost_vs_standard_opd", "final_drift_kl_ref"]
    assert table["aime24 avg@32"].tolist() == ["0.5000 +- 0.0000", "0.7000 +- 0.1414"]
    assert table["aime25 avg@32 mean"].tolist() == [0.25, 0.25]
    assert table["seeds"].tolist() == [1, 2] and table["device_hours"].tolist() == [0.8, 0.8]


def test_token_budget_of_both_methods_side_by_side(tiny_run):
    work, _ = tiny_run
    report = work / "results/tiny/report"
    budget = pd.read_csv(report / "token_budget.csv")
    assert budget[["sft_teacher", "opd_teacher", "seed"]].values.tolist() == [["A", "A", 0]]
    row = budget.iloc[0]
    for method, name in (("lightning", "Lightning OPD"), ("standard", "standard OPD")):
        log = [e for e in read_train_log(work / f"results/tiny/models/{method}-sft-A_teacher-A_seed-0") if "loss" in e]
        # tiny.yaml logs every step: the mean per step is the mean of the logs
        rounding = 0.05 + 1e-9  # the report rounds to 0.1
        assert row[f"{name} tokens/step"] == pytest.approx(sum(e["tokens_per_step"] for e in log) / len(log),
                                                           abs=rounding)
        assert row[f"{name} response tokens/step"] == pytest.approx(
            sum(e["response_tokens_per_step"] for e in log) / len(log), abs=rounding)
        assert row[f"{name} steps"] == log[-1]["step"] == 4
    models = pd.read_csv(report / "models.csv")
    cost = models.set_index("model")["device_hours"]  # the main Lightning OPD run's, not its variants'
    assert row["Lightning OPD device_hours"] == cost["lightning-sft-A_teacher-A_seed-0"]
    assert row["standard OPD device_hours"] == cost["standard-sft-A_teacher-A_seed-0"]
    # a standard OPD step holds n = 2 samples of each of its prompts: twice Lightning OPD's tokens and more
    assert row["standard / Lightning tokens per step"] == pytest.approx(
        row["standard OPD tokens/step"] / row["Lightning OPD tokens/step"], abs=1e-3)
    assert row["standard OPD tokens/step"] > 1.5 * row["Lightning OPD tokens/step"]
    assert re.search(r"\|\s*Lightning OPD tokens/step\s*\|", (report / "token_budget.md").read_text())


def test_tokens_per_step_weights_logs_by_the_steps_they_cover(tmp_path):
    # a log every 2 steps holds the mean since the previous log; the last one covers 1 step
    logs = [{"step": 2, "loss": 1.0, "tokens_per_step": 100.0, "response_tokens_per_step": 60.0},
            {"step": 4, "loss": 1.0, "tokens_per_step": 200.0, "response_tokens_per_step": 80.0},
            {"step": 5, "loss": 1.0, "tokens_per_step": 50.0, "response_tokens_per_step": 10.0},
            {"step": 5, "train_runtime": 3.0}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in logs))
    assert tokens_per_step(tmp_path) == {"tokens": (200 + 400 + 50) / 5, "response_tokens": (120 + 160 + 10) / 5,
                                         "steps": 5}
    # a run resumed from its checkpoint at step 3: its log at step 4 covers step 4 alone (logged_steps)
    resumed = [logs[0], {**logs[1], "logged_steps": 1}, {**logs[2], "logged_steps": 1}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in resumed))
    assert tokens_per_step(tmp_path) == {"tokens": (200 + 200 + 50) / 4, "response_tokens": (120 + 80 + 10) / 4,
                                         "steps": 5}
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="has no tokens_per_step"):
        tokens_per_step(tmp_path)


def test_token_budget_pairs_the_methods_of_each_run(tmp_path):
    models = []
    for role, seed, tokens, response in [("lightning_opd", 0, 100.0, 60.0), ("standard_opd", 0, 400.0, 240.0),
                                         ("lightning_opd", 1, 110.0, 70.0), ("standard_opd", 1, 380.0, 200.0)]:
        model_dir = tmp_path / f"{role}-{seed}"
        model_dir.mkdir()
        (model_dir / "train_log.jsonl").write_text("".join(json.dumps(
            {"step": step, "loss": 0.1, "tokens_per_step": tokens, "response_tokens_per_step": response}) + "\n"
            for step in (1, 2, 3)))
        models.append({"label": f"{role}-{seed}", "role": role, "sft_teacher": "A", "opd_teacher": "B", "seed": seed,
                       "model_dir": str(model_dir)})
    frame = pd.DataFrame({"device_hours": [1.0, 4.0, 1.5, 3.0]})
    budget = token_budget({"models": [{"label": "sft-A", "role": "sft"}, *models]},
                          pd.concat([pd.DataFrame({"device_hours": [0.5]}), frame], ignore_index=True))
    assert budget[["seed", "Lightning OPD tokens/step", "standard OPD tokens/step",
                   "Lightning OPD response tokens/step", "standard OPD response tokens/step", "Lightning OPD steps",
                   "standard OPD device_hours", "standard / Lightning tokens per step"]].values.tolist() == [
        [0, 100.0, 400.0, 60.0, 240.0, 3, 4.0, 4.0], [1, 110.0, 380.0, 70.0, 200.0, 3, 3.0, 3.455]]


def test_training_curves_group_the_seeds_of_a_run(tmp_path):
    """The curves plot one line per method, variant and teacher pair: its seeds share a label, and only
    OPD log entries (with a loss and a reverse KL) count."""
    models = []
    for label, variant, opd_teacher, seed in [("a0", "", "A", 0), ("a1", "", "A", 1), ("k0", "topk4", "A", 0),
                                              ("b0", "", "B", 0)]:
        (tmp_path / label).mkdir()
        log = [{"step": 2, "loss": 1.0, "reverse_kl": 0.1 * (seed + 1), "drift_kl_ref": 0.01},
               {"step": 2, "train_runtime": 5.0}]
        (tmp_path / label / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
        models.append({"label": label, "role": "lightning_opd", "variant": variant, "sft_teacher": "A",
                       "opd_teacher": opd_teacher, "seed": seed, "model_dir": str(tmp_path / label)})
    models.append({"label": "sft-A", "role": "sft", "sft_teacher": "A", "opd_teacher": ""})
    points = training_points({"models": models}, ["reverse_kl", "drift_kl_ref"])
    kl = points[points.key == "reverse_kl"]
    assert kl.groupby("run").seed.nunique().to_dict() == {
        "Lightning OPD SFT A / OPD A": 2, "Lightning OPD [topk4] SFT A / OPD A": 1, "Lightning OPD SFT A / OPD B": 1}
    assert kl[kl.run == "Lightning OPD SFT A / OPD A"].value.mean() == pytest.approx(0.15)
    assert not points.groupby("run").consistent.first()["Lightning OPD SFT A / OPD B"]
    assert len(points) == 8  # 4 runs x 2 keys; the entry without a loss is not a training step


def test_every_trained_model_records_where_it_was_trained(tiny_run):
    """The same code, data and seeds give other weights on another CPU or GPU: each model the pipeline trains
    says where (device, CPU and the instruction set of its kernels, processes, versions), and models.csv
    shows it."""
    work, _ = tiny_run
    models = pd.read_csv(work / "results/tiny/report/models.csv", keep_default_na=False).set_index("model")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the tiny run's trainings ran
    # tiny.yaml trains SFT and both OPD methods on two processes; pretraining runs on one
    for model, processes in (("teacher-A", 1), ("student_base", 1), ("sft-A", 2),
                             ("lightning-sft-A_teacher-A_seed-0", 2), ("standard-sft-A_teacher-A_seed-0", 2)):
        provenance = json.loads((work / f"results/tiny/models/{model}/provenance.json").read_text())
        record = provenance["trained_on"]
        assert (record["device"], record["processes"]) == (device, processes)
        assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert record["torch"] == torch.__version__ and record["device_name"] and record["cpu"]["name"]
        assert models.loc[model, "trained_on"] == trained_on_label(provenance)
        assert models.loc[model, "trained_on"].endswith(f"x {processes}")


def test_the_record_names_the_kernels_held_to_an_instruction_set(monkeypatch):
    from transformers import TrainingArguments

    from lightning_opd.training import KERNEL_ENV, trained_on

    for name in KERNEL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    record = trained_on(TrainingArguments(output_dir="unused", use_cpu=True))
    assert record["device"] == "cpu" and record["cpu_threads"] == torch.get_num_threads()
    assert record["kernel_env"] == {"MKL_CBWR": "AVX2"}
    label = trained_on_label({"trained_on": record})
    assert label.startswith(f"cpu {torch.backends.cpu.get_cpu_capability()}: {record['device_name']}")
    assert label.endswith(" x 1 [MKL_CBWR=AVX2]")


def test_trained_on_label_names_the_gpu_and_is_empty_without_a_record():
    record = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "processes": 8, "cpu_capability": "AVX512",
              "kernel_env": {}}
    assert trained_on_label({"trained_on": record}) == "cuda: NVIDIA H100 80GB HBM3 x 8"
    assert trained_on_label({"stage": "sft"}) == ""  # a hub model, or one trained before the record existed


def test_a_manifest_past_the_argument_limit_reaches_the_report_through_stdin(tiny_run, tmp_path):
    """Linux takes at most 128 KiB in one argument of an exec: the report rule pipes its manifest in, as here
    with 200 KB more of it (a comparison config with six seeds gives ~180 KB)."""
    from test_pipeline import ENV, snakemake

    work, config = tiny_run
    dry = snakemake("-n", "-p", *config, "--forcerun", "report", cwd=work).stdout
    command = next(line for line in dry.splitlines() if "printf '%s' " in line and "lightning_opd.report" in line)
    words = shlex.split(command[command.index("printf"):])
    assert words[:2] == ["printf", "%s"] and words[3] == "|" and "--manifest" in words
    assert words[words.index("--manifest") + 1] == "-"
    manifest = {**json.loads(words[2]), "padding": "x" * 200_000}
    config_json = words[words.index("--config") + 1]
    report = [sys.executable, "-m", "lightning_opd.report", "--config", config_json]
    script = tmp_path / "report.sh"
    script.write_text(f"printf '%s' {shlex.quote(json.dumps(manifest))} | {shlex.join(report)} --manifest - "
                      f"--out-dir {tmp_path / 'piped'}\n")
    piped = subprocess.run(["bash", str(script)], cwd=work, env=ENV, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert (tmp_path / "piped/table.md").read_text() == (work / "results/tiny/report/table.md").read_text()
    with pytest.raises(OSError, match="Argument list too long"):  # what the argument would have met
        subprocess.run([*report, "--manifest", json.dumps(manifest), "--out-dir", str(tmp_path / "argument")],
                       cwd=work, env=ENV)


def test_a_manifest_that_is_not_json_is_refused_and_leaves_no_report(tmp_path, monkeypatch, capsys):
    import io

    from lightning_opd import report

    monkeypatch.setattr(sys, "stdin", io.StringIO('{"experiment": "x"'))  # cut short
    with pytest.raises(SystemExit):
        report.main(["--manifest", "-", "--config", "{}", "--out-dir", str(tmp_path / "report")])
    assert "--manifest (stdin): not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_a_missing_benchmark_file_leaves_no_report(tmp_path, monkeypatch):
    """The missing file is only among the stages (an evaluation's), which the report reads after the
    models' costs: still no table is written."""
    import io

    from lightning_opd import report

    (tmp_path / "sft-A.json").write_text(json.dumps({"k": 4, "avg_at_k": 0.5, "pass_at_k": 0.75, "n_problems": 10}))
    sft = {"stage": "sft", "job": "A", "benchmark": bench(tmp_path / "sft.tsv", 60.0), "devices": 1}
    manifest = {"experiment": "x", "device_kind": "cpu", "caches": [], "eval": {"k": 4, "benchmarks": ["b"]},
                "models": [{"label": "sft-A", "role": "sft", "sft_teacher": "A", "cost": [sft],
                            "evals": {"b": str(tmp_path / "sft-A.json")}}],
                "stages": [sft, {"stage": "evaluate", "job": "b/sft-A", "benchmark": str(tmp_path / "eval.tsv"),
                                 "devices": 1}]}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(manifest)))
    with pytest.raises(ValueError, match=r"eval\.tsv: the benchmark file of stage evaluate \(b/sft-A\) is missing"):
        report.main(["--manifest", "-", "--config", "{}", "--out-dir", str(tmp_path / "report")])
    assert not (tmp_path / "report").exists()
    (tmp_path / "eval.tsv").write_text(HEADER + "10\t0:00:10\t1\t1\t1\t1\t0\t0\t100\t10\n")  # measured: a report
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(manifest)))
    report.main(["--manifest", "-", "--config", "{}", "--out-dir", str(tmp_path / "report")])
    assert "sft-A" in (tmp_path / "report/models.csv").read_text()
