"""`dspark report`: tables and PNG plots from a governance snapshot; one-line errors for bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dspark_jax.governance import GovernedRequest, Governor, policy_from_dict
from dspark_jax.governance.report import format_report
from dspark_jax.testing.fake_clock import FakeClock

POLICY = {
    "gamma": 7, "cost_per_hour_usd": 300.0,
    "classes": {"code": {"rollback": {"threshold": 0.5, "window": 4, "probation_s": 10, "probe_fraction": 0.5}},
                "chat": {"max_draft": 3}, "regulated": {"speculate": False, "max_draft": 0, "scheduler_mode": "off"}},
    "tenants": {"acme": {"classes": "*", "quotas": [{"tokens": 100000, "window_s": 3600}]},
                "beta": {"classes": ["chat"]}},
}


@pytest.fixture
def snapshot_file(tmp_path):
    clock = FakeClock()
    gov = Governor(policy_from_dict(POLICY, "test-policy.yaml"), clock=clock)
    for i, (tenant, cls, acc) in enumerate([("acme", "code", 1), ("acme", "chat", 2), ("beta", "chat", 3),
                                            ("acme", "regulated", 0), ("acme", "code", 1)]):
        clock.t = 10.0 * i
        a = gov.admit(GovernedRequest(tenant=tenant, workload_class=cls, prompt_tokens=40))
        gov.record_start(a.request_id)
        for _ in range(3):
            if a.speculate:
                gov.record_round(a.request_id, verified_draft=3, accepted=acc, committed=acc + 1)
            else:
                gov.record_round(a.request_id, verified_draft=0, accepted=0, committed=1, drafted=False)
        clock.t += 4.0
        gov.record_finish(a.request_id, prompt_tokens=40, output_tokens=30 + i, latency_s=4.0, first_token_s=0.2)
    assert gov.class_state("code") == "rolled_back"
    return gov.write_snapshot(tmp_path / "snapshot.json")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dspark_jax.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_report_writes_tables_and_plots(snapshot_file, tmp_path):
    out = tmp_path / "report"
    r = run_cli("report", "--snapshot", str(snapshot_file), "--output_dir", str(out))
    assert r.returncode == 0, r.stderr
    for text in ("Usage per class", "Speculation and cost per class", "Usage and cost per tenant",
                 "Quotas (current window)", "Speculation switches (1)", "code: speculative -> rolled_back",
                 "rolled_back", "$/M out tok"):
        assert text in r.stdout, text
    assert (out / "report.txt").read_text() == r.stdout
    for name in ("accepted_per_round.png", "cost_per_million_tokens.png", "latency_percentiles.png",
                 "speculation_timeline.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert not list(out.glob(".*tmp"))


def test_report_table_rows(snapshot_file):
    from dspark_jax.governance.snapshot import read_snapshot
    text = format_report(read_snapshot(snapshot_file))
    row = next(line for line in text.splitlines() if line.startswith("code ") and "rolled_back" in line)
    assert "1.00" in row.split()  # accepted draft tokens per drafted round (1 of 3 each round)
    regulated = next(line for line in text.splitlines() if line.startswith("regulated ") and "disabled" in line)
    assert regulated.split()[4] == "n/a"  # no drafted rounds: accepted per round undefined


def test_report_errors_are_one_line(tmp_path):
    r = run_cli("report")
    assert r.returncode == 2 and "--snapshot is required" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("report", "--snapshot", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "snapshot file not found" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "x.json").write_text("[1, 2]")
    r = run_cli("report", "--snapshot", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "not a governance snapshot" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("report", "--help")
    assert r.returncode == 0 and "--snapshot" in r.stdout and "--output_dir" in r.stdout
    assert "report" in run_cli("--help").stdout
