"""The command line as users call it."""
import json
import subprocess
import sys

from conftest import REPO, write_movielens


def fedrpc(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "fedrpc", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_data_stats_prints_counts(tmp_path):
    folder = write_movielens(tmp_path / "ml")
    r = fedrpc("data", "stats", "configs/ml100k.yaml", f"data.path={folder}", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["users"] == 6 and stats["interactions"] == 30
    assert stats["split"]["test"] == 6
    assert stats["content"]["tmdb_duplicate_rows_dropped"] == 1


def test_errors_are_one_line_and_exit_2(tmp_path):
    r = fedrpc("data", "stats", tmp_path / "none.yaml")
    assert r.returncode == 2
    assert r.stderr.strip() == f"fedrpc: error: {tmp_path / 'none.yaml'}: config file not found"
    r = fedrpc("data", "stats", "configs/ml100k.yaml", "data.min_user_interactions=-1")
    assert r.returncode == 2 and "data.min_user_interactions: must be >= 0" in r.stderr


def test_popularity_baseline_writes_results(tmp_path):
    r = fedrpc("baseline", "configs/quickstart.yaml", f"run.out_dir={tmp_path}",
               "data.synthetic.users=60", "data.synthetic.items=80",
               "data.synthetic.mean_interactions=10")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "baseline_popularity.json").read_text())
    assert result["test"]["users"] == 60
    assert 0 <= result["test"]["NDCG@10"] <= result["test"]["HR@10"] <= result["test"]["HR@50"] <= 1


def test_bench_round_reports_every_phase_its_floor_and_top_operators(tmp_path):
    r = fedrpc("bench", "round", "configs/quickstart.yaml", "--json", "--top", "3",
               f"run.out_dir={tmp_path}", "encoder.cache=false", "data.synthetic.users=40",
               "data.synthetic.items=60", "data.synthetic.mean_interactions=10",
               "gfmfr.fusion_epochs=2", "fed.local_epochs=1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["round"] == 1 and out["clients"] == 40
    assert set(out["phases"]) == {"train", "aggregate", "group", "fusion", "eval"}
    for ph in out["phases"].values():
        assert ph["seconds"] >= 0 and ph["floor_s"] > 0 and ph["ratio"] >= 0
    assert out["gfmfr"]["pca_components"] >= 1 and sum(out["gfmfr"]["group_sizes"]) == 40
    assert {"train", "group", "fusion", "eval"} <= set(out["top_ops"])
    assert all(1 <= len(ops) <= 4 for ops in out["top_ops"].values())
    assert not list(tmp_path.iterdir())          # a benchmark writes no run folder
