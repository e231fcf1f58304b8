"""`fedrpc diagnose teacher`: candidate teachers evaluated through the run's metrics."""
from fedrpc.baselines import run_popularity
from fedrpc.config import load_config
from fedrpc.diagnostics import diagnose_teacher

from test_federation import SMALL


def test_teacher_diagnostic_scores_every_candidate_like_a_recommender(tmp_path):
    cfg = load_config(None, SMALL + ["fed.rounds=3", f"run.out_dir={tmp_path}"])
    lines = []
    records = diagnose_teacher(cfg, every=2, progress=lines.append)
    assert [r["round"] for r in records] == [1, 2]          # every 2nd round and the last
    assert len(lines) == 2 and "head(F)" in lines[0]
    pop = run_popularity(load_config(None, SMALL))["test"]
    for r in records:
        assert r["popularity"] == pop                        # the same evaluation path
        for name in ("head(F)", "output(F)", "head(C_bar)", "output(C_bar)",
                     "group popularity (oracle)"):
            assert 0.0 <= r[name]["HR@10"] <= 1.0 and r[name]["users"] == pop["users"]
        assert r["students"]["users"] == pop["users"]
