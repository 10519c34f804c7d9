"""The report turns Snakemake benchmark files into device-hours."""
import pytest

from lightning_opd.report import benchmark_seconds, stage_costs

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def bench(path, *seconds):
    path.write_text(HEADER + "".join(f"{s}\t0:00:00\t1\t1\t1\t1\t0\t0\t100\t{s}\n" for s in seconds))
    return str(path)


def test_device_hours_are_wall_time_times_devices(tmp_path):
    stages = [
        {"stage": "rollouts", "benchmark": bench(tmp_path / "r.tsv", 3600.0), "devices": 8},
        {"stage": "teacher_cache", "benchmark": bench(tmp_path / "c.tsv", 900.0), "devices": 4},
        {"stage": "lightning_opd", "benchmark": bench(tmp_path / "l.tsv", 100.0, 300.0), "devices": 2},
        {"stage": "not_run", "benchmark": str(tmp_path / "missing.tsv"), "devices": 8},
    ]
    costs = stage_costs(stages)
    assert list(costs["stage"]) == ["rollouts", "teacher_cache", "lightning_opd"]
    assert costs["device_hours"].tolist() == pytest.approx([8.0, 1.0, 200.0 * 2 / 3600])
    assert costs["device_hours"].sum() == pytest.approx(9.0 + 400 / 3600)


def test_unreadable_benchmark_is_named(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("not\ta benchmark\n1\t2\n")
    with pytest.raises(ValueError, match="bad.tsv: no 's'"):
        benchmark_seconds(bad)
