"""The CLI end to end: launch (a dying rank does not take the others down), a short drill, the demo."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

SCRIPT = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
open(os.path.join(sys.argv[1], f"rank{rank}"), "w").write(os.environ["WORLD_SIZE"])
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(1.0)
"""


def test_launch_keeps_survivors(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "moe_resilient.cli", "launch", "--nproc", "3", "--timeout", "60",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # one rank failed...
    assert "rank 1 exited with -9" in proc.stderr
    assert "rank 0 exited with 0" in proc.stderr and "rank 2 exited with 0" in proc.stderr  # ...the rest finished
    assert sorted(os.listdir(tmp_path)) == ["rank0", "rank1", "rank2", "script.py"]


SMALL = ["--layers", "2", "--hidden", "64", "--experts", "8"]  # the drill's default model is larger


def test_drill_writes_json_and_plot(tmp_path):
    """The drill's own model (4 layers, hidden 512, 16 experts), compiled: JSON and PNG written."""
    out_json, out_png = tmp_path / "drill.json", tmp_path / "drill.png"
    proc = subprocess.run([sys.executable, "-m", "moe_resilient.cli", "drill", "--nproc", "4", "--steps", "16",
                           "--fail-step", "5", "--json", str(out_json), "--plot", str(out_png)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "serving:" in proc.stdout and "pause" in proc.stdout  # progress, then the summary
    result = json.loads(out_json.read_text())
    # the rank dies once it has served 5+ steps (how many more, timing decides): its batch of the step the
    # survivors found it gone is re-run, no other
    assert result["failure_step"] >= 5
    assert result["lost_batches"] == [] and result["rerun_batches"] == [[result["failure_step"] - 1, 2],
                                                                      [result["failure_step"], 2]]
    assert 0 < result["detection_latency_s"] < result["pause_s"]
    assert result["compiled"] and result["recompiles"] == 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the seed systems' figures
    assert result["stall_s"] > 0 and result["pause_s"] > 0  # a batch in flight at the kill may split the gap
    assert result["capacity_retained"] == 0.75 and result["rejoin_pause_s"] is None
    assert result["throughput_before_tok_s"] > 0
    assert {"time_to_95pct_throughput_s", "throughput_after_tok_s", "throughput_retained"} <= set(result)
    assert [p[0] for p in result["phases"]] == [0, 1, 3]
    assert all(t_fail <= detect <= agreed <= done for _, detect, agreed, done in result["phases"]
               for t_fail in [result["fail_time"]])
    assert {(rank, tokens) for rank, _, _, tokens in result["batches"]} == {(r, 32) for r in range(4)}
    assert result["model"] == {"layers": 4, "hidden": 512, "experts": 16} and result["slots_per_rank"] == 6


@pytest.mark.parametrize("args, message", [
    (["--fail-rank", "4"], "--fail-rank 4: ranks are 0..3"),
    (["--fail-step", "30", "--steps", "10"], r"--fail-step 30: it must lie in \[0, --steps 10\)"),
    (["--nproc", "1"], "--nproc 1: a drill needs at least 2 ranks"),
    (["--fail-rank", "1,x"], "'1,x' is not a comma-separated list of integers"),
    (["--fail-rank", "1,3", "--fail-step", "5,6,7"], "--fail-step names 3 steps for 2 ranks"),
    (["--fail-rank", "1,1"], r"--fail-rank \[1, 1\]: a rank can fail once"),
    (["--fail-rank", "0,1,2,3"], "at least one of the 4 ranks must survive"),
    (["--fail-host", "0"], "--fail-host needs --ranks-per-host dividing --nproc 4"),
    (["--fail-host", "2", "--ranks-per-host", "2"], r"--fail-host 2: hosts are 0..1"),
    (["--serving", "--fail-rank", "1,2"], r"--serving fails one rank of 0..3"),
    (["--serving", "--prompt-tokens", "9,3"], "--prompt-tokens takes LOW,HIGH"),
    (["--serving", "--hang", "--baseline", "restart"], "a hung rank does not exit"),
    (["--serving", "--expert-ranks", "1", "--fail-rank", "3"], "no expert rank would outlive rank 3"),
    (["--serving", "--expert-ranks", "3", "--fail-rank", "0"], "no attention rank would outlive rank 0"),
])
def test_drill_refuses_bad_arguments_at_once(args, message):
    proc = subprocess.run([sys.executable, "-m", "moe_resilient.cli", "drill", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr


def test_drill_with_two_ranks(tmp_path):
    out_json = tmp_path / "drill.json"
    proc = subprocess.run([sys.executable, "-m", "moe_resilient.cli", "drill", "--nproc", "2", "--steps", "12",
                           "--fail-rank", "0", "--fail-step", "4", "--eager", "--json", str(out_json), *SMALL],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out_json.read_text())
    assert result["lost_batches"] == [] and result["exit_codes"] == {"0": -9, "1": 0}
    assert result["capacity_retained"] == 0.5


def test_launcher_environment(monkeypatch):
    """torchrun-compatible variables, the liveness board, and defaults a user's environment overrides."""
    from moe_resilient.launch import Launcher
    from moe_resilient.liveness import ENV

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    launcher = Launcher(2, [sys.executable, "-c", "pass"], env={"OMP_NUM_THREADS": "2"})
    try:
        env = launcher.env_for(1)
        assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("1", "2", str(launcher.port))
        assert env[ENV] == launcher.board.path and os.path.exists(launcher.board.path)
        assert env["OMP_NUM_THREADS"] == "2"
    finally:
        launcher.close()
    assert not os.path.exists(launcher.board.path)


def _demo(*args):
    from click.testing import CliRunner

    from moe_resilient.cli import main

    return CliRunner().invoke(main, ["demo", "--hidden", "32", "--intermediate", "48", "--tokens", "8", *args])


def test_demo_edits_a_compiled_layer_without_recompiling():
    """The README's demo: replicas into spare slots, then a rank dies; outputs stay the healthy ones."""
    result = _demo()
    assert result.exit_code == 0, result.output
    diffs = [float(line.rsplit(" ", 1)[1]) for line in result.output.splitlines() if "vs healthy" in line]
    assert len(diffs) >= 2 and max(diffs) < 1e-5, result.output
    assert "rank 0 dies" in result.output and "recompiles: 0" in result.output


def test_demo_names_a_missing_device():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = _demo("--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device here" in result.output


@pytest.mark.parametrize("args, failed", [
    (["--fail-rank", "1,3", "--fail-step", "4,8"], [1, 3]),
    (["--fail-host", "1", "--ranks-per-host", "2", "--fail-step", "4"], [2, 3]),
], ids=["two-ranks-own-steps", "whole-host"])
def test_drill_fails_several_ranks_or_a_host(tmp_path, args, failed):
    out_json = tmp_path / "drill.json"
    proc = subprocess.run([sys.executable, "-m", "moe_resilient.cli", "drill", "--steps", "16", "--eager", "--json",
                           str(out_json), *SMALL, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out_json.read_text())
    assert result["failed_ranks"] == failed and result["lost_batches"] == []
    assert [f["rank"] for f in result["faults"]] == failed
    assert all(f["lost_at_step"] >= f["step"] for f in result["faults"])
    assert result["exit_codes"] == {str(r): -9 if r in failed else 0 for r in range(4)}
    assert result["capacity_retained"] == 0.5
