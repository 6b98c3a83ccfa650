"""bench.gpu_check's budget and part handling, on the CPU: dry run, no-GPU exit, a fake clock for the
budget, and tiny fake parts (subprocesses that sleep, crash or report) for limits and kills."""
import json
import subprocess
import sys
import time

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Part, Runner


def test_dry_run_prints_every_part_and_its_limit(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for p in gpu_check.PARTS:
        assert f"{p.name:<12} limit {p.limit_s:>4.0f} s" in out
    assert "budget 480 s" in out and "(only if time is left)" in out


def test_default_plan_fits_its_budget_and_keeps_the_order():
    assert [p.name for p in gpu_check.PARTS] == ["env", "correctness", "step", "kernels", "tests", "extra"]
    assert sum(p.limit_s for p in gpu_check.PARTS if not p.optional) <= gpu_check.DEFAULT_BUDGET_S <= 8 * 60
    assert [p.name for p in gpu_check.PARTS if p.optional] == ["extra"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_a_gpu_it_stops_at_once_saying_so(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run(["bash", "bench/run_gpu.sh", "--quick", "--out", str(tmp_path / "o")], cwd=gpu_check.ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no GPU" in r.stderr, (r.returncode, r.stderr)
    assert not (tmp_path / "o").exists() and time.monotonic() - t0 < 60


def test_only_rejects_unknown_parts(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--only", "env,bogus"])
    assert "unknown part(s) ['bogus']" in capsys.readouterr().err


def test_budget_with_a_fake_clock_skips_parts_that_no_longer_fit(tmp_path):
    now = [0.0]
    took = {"a": 50, "b": 30, "c": 10, "d": 5}  # seconds each part "runs" on the fake clock
    ran = []

    def launch(part, out, log, timeout):
        ran.append((part.name, timeout))
        now[0] += min(took[part.name], timeout)
        return ("killed", None) if took[part.name] > timeout else ("ok", 0)

    parts = [Part("a", 40, "x"), Part("b", 40, "x"), Part("c", 25, "x"), Part("d", 25, "x", optional=True)]
    recs = Runner(parts, tmp_path, budget_s=100, clock=lambda: now[0], launch=launch, echo=lambda s: None).run()
    # a is killed at its 40 s limit; b takes 30 (70 used); c needs 25 <= 30 left, takes 10; d needs 25 > 20 left.
    assert ran == [("a", 40), ("b", 40), ("c", 25)]
    assert [r["status"] for r in recs] == ["killed", "ok", "ok", "skipped"]
    assert recs[0]["wall_s"] == 40 and "killed at its 40 s limit" in recs[0]["reason"]
    assert recs[3]["reason"] == "20 s of budget left, under its 25 s limit" and "wall_s" not in recs[3]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["total_s"] == 80 and "a: killed (killed at its 40 s limit)" in s["failures"]


def _py(code):
    return [sys.executable, "-c", code]


REPORT = ("import json, os; json.dump({'figures': [{'name': 'n', 'value': 1.5, 'unit': 'GB/s', 'shape': '8x8', "
          "'dtype': 'bf16', 'note': ''}], 'results': {'k': 1}, 'failures': %r}, "
          "open(os.environ['" + gpu_check.RESULT_ENV + "'], 'w'))")


def test_real_subprocesses_hang_crash_and_report(tmp_path, capsys):
    parts = [
        Part("hang", 1.5, "sleeps past its limit, after reporting", argv=_py(REPORT % [] + "; import time; time.sleep(60)")),
        Part("crash", 20, "raises", argv=_py("print('about to crash'); raise SystemExit(3)")),
        Part("good", 20, "reports a figure", argv=_py(REPORT % [])),
        Part("bad", 20, "reports a failure, exits 0", argv=_py(REPORT % ["test_x: wrong"])),
    ]
    t0 = time.monotonic()
    recs = Runner(parts, tmp_path, budget_s=100).run()
    assert time.monotonic() - t0 < 15  # the hang was killed at 1.5 s, not waited for
    by = {r["part"]: r for r in recs}
    assert by["hang"]["status"] == "killed" and by["hang"]["figures"][0]["unit"] == "GB/s"  # partial results kept
    assert by["crash"]["status"] == "failed" and by["crash"]["returncode"] == 3
    assert by["good"]["status"] == "ok" and by["good"]["results"] == {"k": 1}
    assert by["bad"]["status"] == "failed" and by["bad"]["failures"] == ["test_x: wrong"]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["failures"] == ["bad: test_x: wrong", "hang: killed (killed at its 2 s limit)", "crash: failed (exit 3)"]
    md = (tmp_path / "summary.md").read_text()
    assert "| hang | killed |" in md and "| n | 1.5 | GB/s | 8x8 | bf16 |" in md and "- crash: failed (exit 3)" in md
    assert "about to crash" in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "parts").exists()  # every part's file was folded into the summary


def test_summary_is_written_after_each_part(tmp_path):
    seen = []

    def launch(part, out, log, timeout):
        if (out / "summary.json").exists():
            seen.append([r["part"] for r in json.loads((out / "summary.json").read_text())["parts"]])
        if part.name == "b":
            raise KeyboardInterrupt  # the runner itself stopped (SIGTERM) during part b
        return "ok", 0

    with pytest.raises(KeyboardInterrupt):
        Runner([Part("a", 1, "x"), Part("b", 1, "x"), Part("c", 1, "x")], tmp_path, 10, launch=launch,
               echo=lambda s: None).run()
    assert seen == [["a"]]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["part"], r["status"]) for r in s["parts"]] == [("a", "ok"), ("b", "interrupted")]
    assert "b: interrupted (the runner was stopped during this part)" in s["failures"]


def test_pytest_parts_name_each_failure_and_turn_benchmarks_into_figures(tmp_path):
    """The collector the pytest-driven parts use, on a tiny suite: outcomes by node id, the failure's
    last line, and a benchmark's extra_info (as bench/harness.py fills it) as figures with units."""
    (tmp_path / "test_tiny.py").write_text(
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "def test_wrong():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no')\ndef test_skipped():\n    pass\n"
        "def test_bench(benchmark):\n"
        "    benchmark.pedantic(lambda: None, rounds=1)\n"
        "    benchmark.extra_info.update(op='gelu-fwd', impl='fastgpt', shape='16384x3072', dtype='bf16',\n"
        "                                median_s=2e-5, gb_per_s=5000.0, bytes=1e8, hbm_utilisation=0.5)\n")
    result = tmp_path / "r.json"
    code = ("import sys; from bench.gpu_check import PartResult, _pytest, _bench_figures; "
            f"res = PartResult({str(result)!r}); sys.exit(_pytest(res, [{str(tmp_path / 'test_tiny.py')!r}], "
            "_bench_figures(res)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=gpu_check.ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    data = json.loads(result.read_text())
    outcomes = {k.split("::")[1]: v["outcome"] for k, v in data["results"]["tests"].items()}
    assert outcomes == {"test_ok": "passed", "test_wrong": "failed", "test_skipped": "skipped", "test_bench": "passed"}
    assert len(data["failures"]) == 1 and "test_wrong" in data["failures"][0] and "one is not two" in data["failures"][0]
    figs = {(f["unit"]): f["value"] for f in data["figures"]}
    assert figs == {"us (median)": pytest.approx(20.0), "GB/s": 5000.0, "% of HBM peak": 50.0}
    assert {f["shape"] for f in data["figures"]} == {"16384x3072"} and {f["dtype"] for f in data["figures"]} == {"bf16"}
