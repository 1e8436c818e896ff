"""Steady-state step cost of ElasticGroup (shared memory among its 4 ranks) against a plain fixed
torch.distributed group.

    python -m pytest benchmarks/test_elastic_step.py --benchmark-json=benchmarks/results/elastic_step.json
"""

import json
import os
import sys

from moe_resilient.launch import Launcher


def test_elastic_step_overhead(benchmark, tmp_path):
    out = tmp_path / "step.json"
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "elastic_step_worker.py"), str(out)]

    def run():
        with Launcher(4, cmd, env={"MOE_RESILIENT_TRANSPORT": "auto"}, log_dir=str(tmp_path / "logs")) as launcher:
            codes = launcher.wait(300)
        assert codes == {r: 0 for r in range(4)}, codes
        return json.loads(out.read_text())

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(result)
