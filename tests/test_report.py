"""`fedrpc report`: its numbers are the ledger's, and the page is self-contained."""
import csv
import json
import re

from fedrpc.cli import main
from fedrpc.config import load_config
from fedrpc.runtime import run_local

SMALL = ["data.synthetic.users=30", "data.synthetic.items=50",
         "data.synthetic.mean_interactions=10", "data.synthetic.min_interactions=5",
         "fed.latent_dim=8", "fed.local_epochs=1", "fed.batch_size=32", "fed.rounds=3",
         "gfmfr.groups=3", "gfmfr.fusion_epochs=3", "run.progress=false",
         "encoder.cache=false", "fed.workers=2", "eval.interval=2"]


def test_report_numbers_equal_the_ledger_and_the_page_opens_offline(tmp_path):
    runs = {"dense": [], "sparse": ["fed.protocol=sparse", "fed.precision=fp16"],
            "secagg": ["fed.protocol=secagg"]}
    for name, over in runs.items():
        run_local(load_config(None, SMALL + [f"run.out_dir={tmp_path / name}", *over]))
    out = tmp_path / "report"
    assert main(["report", *(str(tmp_path / name) for name in runs), "--out", str(out)]) == 0
    table = list(csv.DictReader(open(out / "rounds.csv")))
    assert [(r["run"], r["round"]) for r in table] == [
        (n, str(i)) for n in runs for i in range(3)]
    for name in runs:
        recs = [json.loads(line) for line in open(tmp_path / name / "rounds.jsonl")]
        cum = 0
        for rec, row in zip(recs, [r for r in table if r["run"] == name]):
            lg, phys = rec["bytes"]["logical"], rec["bytes"]["physical"]
            down = lg["train_down"]["mean"] + lg.get("eval_down", {}).get("mean", 0) + \
                lg.get("upload_down", {}).get("mean", 0)
            up = lg["train_up"]["mean"] + lg.get("upload_up", {}).get("mean", 0)
            cum += down + up
            assert float(row["client_up_B"]) == up
            assert float(row["client_down_B"]) == down
            assert float(row["client_cumulative_B"]) == cum
            assert float(row["physical_into_server_B"]) == phys["1->0"]["payload"] + \
                phys["2->0"]["payload"]
            assert float(row["physical_out_of_server_B"]) == phys["0->1"]["payload"] + \
                phys["0->2"]["payload"]
            test = rec.get("metrics", {}).get("test")
            assert row["test_HR@50"] == (str(test["HR@50"]) if test else "")
            assert row["group_sizes"].split() == list(map(str, rec["gfmfr"]["group_sizes"]))
        # the sparse fp16 run moved fewer bytes per client, and the table says so
        assert cum > 0
    page = (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["bytes_per_client.png", "efficiency.png", "groups.png", "metrics.png",
                    "physical.png", "seconds.png"]
    assert page.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r'(src|href)="(?!data:)', page)        # nothing to fetch
    up = {r["run"]: float(r["client_up_B"]) for r in table if r["round"] == "0"}
    assert up["sparse"] < up["dense"] and up["secagg"] == up["dense"] + 32   # + its public key

    assert f"{up['dense'] / 1e6:.4f}" in page


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no rounds.jsonl" in capsys.readouterr().err
