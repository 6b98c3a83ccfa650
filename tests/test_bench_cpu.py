"""bench.cpu on a very small preset: every system holds the same weights (first-step losses agree, the
benchmark checks that itself) and greedy generation gives the same ids in fastgpt and transformers."""
from _train_util import add_nano
from bench import cpu


def test_systems_share_weights_and_greedy_ids(monkeypatch):
    add_nano(monkeypatch)
    thr = cpu.throughput("nano", 2, 16, reps=1)
    assert set(thr) == set(cpu.SYSTEMS)
    losses = [r["first_loss"] for r in thr.values()]
    assert max(losses) - min(losses) < 1e-4 and all(len(r["tok_per_cpu_s"]) == 1 for r in thr.values())
    gen = cpu.generation("nano", 6, reps=1)
    assert all(g["same_ids"] for g in gen.values())
    table = cpu.render("nano", 2, 16, {"throughput": thr, "generation": gen})
    assert "| fastgpt |" in table and "1.00x" in table  # nanoGPT is the reference row


def test_table_gives_both_rss_growths_against_nanogpt():
    thr = {n: {"tok_per_cpu_s": [100.0 * (i + 1)], "first_loss": 1.0} for i, n in enumerate(("fastgpt", "nanogpt"))}
    mib = 2**20
    res = {"throughput": thr,
           "rss": {"fastgpt": {"before": 1000 * mib, "peak": 1100 * mib},
                   "nanogpt": {"before": 1000 * mib, "peak": 1400 * mib}},
           "rss_live": {"fastgpt": {"before": 900 * mib, "peak": 1200 * mib},
                        "nanogpt": {"before": 900 * mib, "peak": 1500 * mib}}}
    row = next(ln for ln in cpu.render("x", 1, 1, res).splitlines() if ln.startswith("| fastgpt |"))
    assert row == ("| fastgpt | 100 (100-100) | 0.50x | 100 MiB | 0.25x | 1,100 MiB | 300 MiB | 0.50x "
                   "| 1,200 MiB | - |")


def test_glibc_growth_is_the_median_run_with_its_range():
    mib = 2**20
    runs = [{"before": 1000 * mib, "peak": (1000 + g) * mib} for g in (300, 100, 200)]
    med = cpu._median_run(runs)
    assert med["peak"] - med["before"] == 200 * mib and med["runs"] == runs
    res = {"throughput": {"fastgpt": {"tok_per_cpu_s": [1.0], "first_loss": 1.0}}, "rss": {"fastgpt": med}}
    assert "| 200 (100-300) MiB |" in cpu.render("x", 1, 1, res)
