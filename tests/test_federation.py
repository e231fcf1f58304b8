"""The federation in one process: reproducibility, independence from the number of
workers, exact byte accounting, privacy of what the server receives, failures."""
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrpc.config import load_config
from fedrpc.messages import CheckpointReply, EvalReply, HelloReply, TrainReply
from fedrpc.runtime import run_local
from fedrpc.server import RoundFailed
from fedrpc.worker import Worker

SMALL = ["data.synthetic.users=30", "data.synthetic.items=50",
         "data.synthetic.mean_interactions=10", "data.synthetic.min_interactions=5",
         "fed.latent_dim=8", "fed.local_epochs=1", "fed.batch_size=32", "fed.rounds=3",
         "gfmfr.groups=3", "gfmfr.fusion_epochs=3", "run.progress=false",
         "encoder.cache=false"]


def run(tmp_path, *over):
    cfg = load_config(None, SMALL + [f"run.out_dir={tmp_path}", *over])
    return run_local(cfg)


def metrics(summary_dir):
    import json
    return [json.loads(l).get("metrics") for l in open(summary_dir / "rounds.jsonl")]


def test_same_seed_same_numbers(tmp_path):
    a = run(tmp_path / "a")
    b = run(tmp_path / "b")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert a["test"] == b["test"]
    c = run(tmp_path / "c", "run.seed=1")
    assert metrics(tmp_path / "c") != metrics(tmp_path / "a")


@pytest.mark.parametrize("backbone", ["fedrap", "fedavgmf"])
def test_numbers_do_not_depend_on_the_number_of_workers(tmp_path, backbone):
    for w in (1, 2, 3):
        run(tmp_path / f"w{w}", f"fed.workers={w}", f"fed.backbone={backbone}",
            "fed.client_fraction=0.6")
    assert metrics(tmp_path / "w1") == metrics(tmp_path / "w2") == metrics(tmp_path / "w3")


def test_batched_run_equals_one_client_at_a_time(tmp_path):
    run(tmp_path / "b", "fed.rounds=2")
    run(tmp_path / "o", "fed.rounds=2", "fed.batched=false")
    mb, mo = metrics(tmp_path / "b"), metrics(tmp_path / "o")
    for rb, ro in zip(mb, mo):
        for split in ("valid", "test"):
            for k, v in rb[split].items():
                assert v == pytest.approx(ro[split][k], abs=1e-6)


def test_logical_bytes_equal_the_protocol_formula(tmp_path):
    import json
    from fedrpc.data import load_interactions
    run(tmp_path, "fed.workers=2")
    I = load_interactions(load_config(None, SMALL)).n_items
    d, F = 8, 4
    shared = I * d * F                                    # FedRAP shares C only
    up = shared + (d + 1) * F                             # + its head (w_u, b_u) for grouping
    recs = [json.loads(l) for l in open(tmp_path / "rounds.jsonl")]
    for rec in recs:
        lg = rec["bytes"]["logical"]
        n = rec["clients"]
        assert n == 30
        down = shared + (I * F if rec["round"] >= 1 else 0)    # + g_k from round 1
        assert lg["train_down"] == {"clients": n, "mean": down, "max": down, "total": n * down}
        assert lg["train_up"] == {"clients": n, "mean": up, "max": up, "total": n * up}
        phys = rec["bytes"]["physical"]
        assert set(phys) == {"0->1", "1->0", "0->2", "2->0"}
        # one copy of the shared parameters per worker crosses, not one per client
        assert phys["0->1"]["payload"] < lg["train_down"]["total"]
    # the MLP variant shares its whole network and uploads nothing else
    run(tmp_path / "mlp", "fed.backbone=fedrap_mlp")
    shared = (I * d + 2 * d * d + d + d + 1) * F          # C + W1, b1, w2, b2
    for rec in (json.loads(l) for l in open(tmp_path / "mlp" / "rounds.jsonl")):
        down = shared + (I * F if rec["round"] >= 1 else 0)
        assert rec["bytes"]["logical"]["train_down"]["mean"] == down
        assert rec["bytes"]["logical"]["train_up"]["mean"] == shared
    # without GFMFR, FedRAP uploads C alone
    run(tmp_path / "alone", "gfmfr.enabled=false")
    for rec in (json.loads(l) for l in open(tmp_path / "alone" / "rounds.jsonl")):
        assert rec["bytes"]["logical"]["train_up"]["mean"] == I * d * F


def test_server_receives_no_interactions_and_no_private_parameters(tmp_path, monkeypatch):
    received = []
    orig = Worker.handle

    def spy(self, msg):
        reply = orig(self, msg)
        received.append((self, reply))
        return reply

    monkeypatch.setattr(Worker, "handle", spy)
    run(tmp_path, "fed.workers=2")
    assert received
    for worker, reply in received:
        private = (list(worker.state.private.values())
                   + [values for _, values in worker.state.tables.values()])
        if isinstance(reply, TrainReply):
            # shared parameters, and the head the backbone declares for grouping (README)
            declared = set(worker.backbone.group_only)
            assert set(reply.shared) == {p.name for p in worker.backbone.shared()} | declared
            assert declared <= {"w", "b"}                        # never an item table
            for t in (v for k, v in reply.shared.items() if k not in declared):
                t = getattr(t, "values", t)        # an item table travels as its rows
                for p in private:
                    assert t.shape[1:] != p.shape[1:] or not torch.equal(t, p[:len(t)])
            # per client only the uploads: no sample count under fed.aggregation=mean, the
            # losses as the worker's sums. Which items a client trained on IS readable
            # from a dense or sparse item table: tests/test_protocols.py runs that attack.
            # seconds and peak_rss_mb are the worker process's, not a client's
            assert set(vars(reply)) == {"round", "users", "shared", "n_samples", "loss_sum",
                                        "kl_sum", "seconds", "peak_rss_mb"}
            assert reply.n_samples is None
            assert type(reply.loss_sum) is int and type(reply.kl_sum) is int
        elif isinstance(reply, EvalReply):
            for sums in reply.sums.values():
                assert all(isinstance(v, int) for v in sums.values())   # sums only
        elif isinstance(reply, HelloReply):
            assert set(vars(reply)) == {"rank", "users", "item_ids", "id_base", "id_space"}
        elif isinstance(reply, CheckpointReply):    # the worker keeps its file; the server
            assert set(vars(reply)) == {"path", "sha256", "bytes", "clients", "seconds"}
        else:
            assert reply is None


def test_a_failing_worker_is_named(tmp_path, monkeypatch):
    def boom(self, req):
        if self.rank == 2:
            raise RuntimeError("disk on fire")
        return orig(self, req)

    orig = Worker.train
    monkeypatch.setattr(Worker, "train", boom)
    with pytest.raises(RoundFailed, match="worker rank 2: RuntimeError: disk on fire"):
        run(tmp_path, "fed.workers=2")


def test_group_fusion_distillation_beats_its_backbone_on_the_quickstart_data(tmp_path):
    """The plugged-in distillation improves FedAvg-MF (measured: test HR@10 0.307 -> 0.340,
    NDCG@10 0.170 -> 0.190 at round 60; 0.300 -> 0.387 before a client's partial minibatch
    took a proportionally smaller step, see fedrpc.training). Not asserted: that the gain comes from the item content — a
    teacher built with no content features gains as much (README, "What GFMFR's gain is
    made of")."""
    base = ["fed.backbone=fedavgmf", "fed.rounds=60", "eval.interval=10",
            "gfmfr.fusion_epochs=5", "run.progress=false", "encoder.cache=false"]
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    alone = run_local(load_config(quickstart,
                                  base + ["gfmfr.enabled=false", f"run.out_dir={tmp_path / 'a'}"]))
    fused = run_local(load_config(quickstart, base + [f"run.out_dir={tmp_path / 'g'}"]))
    assert fused["test"]["HR@10"] >= alone["test"]["HR@10"] + 0.02
    assert fused["test"]["NDCG@10"] >= alone["test"]["NDCG@10"] + 0.01


def _gfmfr_folder(folder, string_ids: bool, features: bool):
    rng = np.random.default_rng(0)
    folder.mkdir()
    lines = ["user_id,item_id,timestamp"]
    for u in range(20):
        for t, i in enumerate(rng.choice(30, size=8, replace=False)):
            lines.append(f"{'A%03dX' % u if string_ids else u},{'B%04d' % i if string_ids else i},{t}")
    (folder / "inter.csv").write_text("\n".join(lines) + "\n")
    if features:
        np.save(folder / "text_features.npy", rng.normal(size=(30, 6)).astype(np.float32))
    return folder


def test_gfmfr_runs_on_id_only_and_string_id_folders(tmp_path):
    """An interactions-only gfmfr folder (string ids) runs GFMFR with no content, and
    backend none drops the precomputed features of a folder that has them."""
    common = ["data.format=gfmfr", "fed.rounds=2", "eval.interval=2"]
    ids = _gfmfr_folder(tmp_path / "ids", string_ids=True, features=False)
    s = run(tmp_path / "a", f"data.path={ids}", *common)
    assert s["rounds_run"] == 2 and s["test"]["users"] == 20
    assert s["features"]["text"]["source"] == "absent"
    feats = _gfmfr_folder(tmp_path / "feats", string_ids=False, features=True)
    on = run(tmp_path / "b", f"data.path={feats}", *common)
    assert on["features"]["text"]["source"] == "precomputed"
    off = run(tmp_path / "c", f"data.path={feats}", *common, "encoder.text.backend=none",
              "encoder.image.backend=none")
    assert off["features"]["text"]["source"] == "disabled"


def test_content_prior_ranks_cold_items_by_their_content(tmp_path):
    """gfmfr.content_prior gives items no client trains on (data.split=cold_items) a row
    from their content: on the quickstart data (preference planted in the content) it
    ranks the cold items better than the backbone, than the paper's GFMFR, and than the
    same run without content (measured at round 4, cold:NDCG@10: 0.195 against 0.128,
    0.132 and 0.117)."""
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    base = ["data.split=cold_items", "fed.backbone=fedavgmf", "fed.rounds=5",
            "eval.interval=5", "gfmfr.fusion_epochs=5", "run.progress=false",
            "encoder.cache=false"]
    runs = {"backbone": ["gfmfr.enabled=false"], "paper": [],
            "prior": ["gfmfr.content_prior=0.5"],
            "no content": ["gfmfr.content_prior=0.5", "encoder.text.backend=none",
                           "encoder.image.backend=none"]}
    cold = {name: run_local(load_config(quickstart, base + over + [
        f"run.out_dir={tmp_path / str(i)}"]))["test"]["cold:NDCG@10"]
        for i, (name, over) in enumerate(runs.items())}
    for other in ("backbone", "paper", "no content"):
        assert cold["prior"] >= cold[other] + 0.02, cold
