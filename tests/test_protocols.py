"""Upload protocols (fed.protocol) and transfer precision (fed.precision): what the
server can read from what it receives, exact byte formulas, and the same numbers
whatever the packing."""
import json

import numpy as np
import pytest
import torch

from fedrpc.config import load_config
from fedrpc.messages import TrainReply, TrainRequest
from fedrpc.runtime import run_local
from fedrpc.state import ServerState
from fedrpc.strategy import GFMFR
from fedrpc.rows import Rows
from fedrpc.strategy.sparse import DenseRows, QuantizedRows, SparseRows
from fedrpc.training import build_client_batches
from fedrpc.worker import Worker

import launch

# the small federation of the multi-process tests, every client taking part (later
# overrides win)
SMALL = launch.SMALL + ["fed.rounds=2", "fed.client_fraction=1.0", "fed.backbone=fedavgmf"]
D = 8


def _n_items() -> int:
    from fedrpc.data import load_interactions
    return load_interactions(load_config(None, SMALL)).n_items


I = _n_items()          # the synthetic catalogue after filtering


def run(tmp_path, *over, spy=None):
    cfg = load_config(None, SMALL + [f"run.out_dir={tmp_path}", *over])
    return run_local(cfg)


def records(out):
    return [json.loads(line) for line in open(out / "rounds.jsonl")]


@pytest.fixture
def received(monkeypatch):
    """(worker, request, reply) of every train exchange: what the server receives."""
    seen = []
    orig = Worker.handle

    def spy(self, msg):
        reply = orig(self, msg)
        if isinstance(msg, TrainRequest):
            seen.append((self, msg, reply))
        return reply

    monkeypatch.setattr(Worker, "handle", spy)
    return seen


def training_items(worker, req):
    """Ground truth: per client, the items of its minibatches this round (positives and
    the negatives sampled for it), recomputed from its private data and seeds."""
    s = worker.settings(req)
    b = build_client_batches(req.users, worker.split.train_indptr, worker.split.train_items,
                             worker.n_items, s)
    return {int(u): set(np.unique(b.samples(j)[0]).tolist())
            for j, u in enumerate(req.users)}


def touched_rows(req, reply):
    """The attack: per client, the rows of its uploaded item table that differ from the
    table the server sent it (dense), or the row indices it sent (sparse)."""
    up = reply.shared["Q"]
    if isinstance(up, DenseRows):      # logically the whole table: compare it with the sent one
        sent = req.shared["Q"].float()
        up = Rows(up.counts.long(), up.index.long(), up.values.float(), sent).dense()
    elif isinstance(up, (SparseRows, QuantizedRows)):
        ends = np.cumsum(up.counts.numpy())
        return {int(u): set(up.index[e - c:e].tolist())
                for u, c, e in zip(reply.users, up.counts.numpy(), ends)}
    changed = (up.float() != req.shared["Q"].float().unsqueeze(0)).any(-1)
    return {int(u): set(torch.nonzero(changed[j]).flatten().tolist())
            for j, u in enumerate(reply.users)}


@pytest.mark.parametrize("protocol", ["dense", "sparse", "sparse_int8"])
def test_the_touched_row_attack_recovers_every_clients_training_items(tmp_path, received,
                                                                        protocol):
    """README, "Communication": dense and sparse uploads tell the server which items each
    client trained on. This is the attack run against what the server received."""
    run(tmp_path, "fed.workers=2", f"fed.protocol={protocol}")
    n = 0
    for worker, req, reply in received:
        truth = training_items(worker, req)
        got = touched_rows(req, reply)
        assert got == truth                   # exact, for every client, every round
        positives = worker.split.train_items
        for u in truth:
            own = set(positives[worker.split.train_indptr[u]:worker.split.train_indptr[u + 1]])
            assert own <= got[u] and len(got[u]) < I      # its positives, not the catalogue
            n += 1
    assert n == 2 * 30


@pytest.mark.parametrize("aggregation", ["mean", "samples"])
def test_sample_counts_travel_only_when_aggregation_uses_them(tmp_path, received, aggregation):
    run(tmp_path, "fed.rounds=1", f"fed.aggregation={aggregation}")
    for worker, req, reply in received:
        assert set(vars(reply)) == {"round", "users", "shared", "n_samples", "loss_sum",
                                    "kl_sum", "seconds", "peak_rss_mb"}
        assert isinstance(reply.loss_sum, int) and isinstance(reply.kl_sum, int)  # sums only
        if aggregation == "mean":
            assert reply.n_samples is None
        else:
            assert reply.n_samples.tolist() == training_items_count(worker, req)
    up = records(tmp_path)[0]["bytes"]["logical"]["train_up"]["mean"]
    assert up == (I * D + D + 1) * 4 + (8 if aggregation == "samples" else 0)


def training_items_count(worker, req):
    s = worker.settings(req)
    b = build_client_batches(req.users, worker.split.train_indptr, worker.split.train_items,
                             worker.n_items, s)
    return b.n_samples.tolist()


def test_sparse_gives_the_dense_numbers_and_its_byte_formula(tmp_path, received):
    run(tmp_path / "dense", "fed.workers=2")
    truth = {}
    for worker, req, _ in received:
        truth.setdefault(req.round, {}).update(training_items(worker, req))
    run(tmp_path / "sparse", "fed.workers=2", "fed.protocol=sparse")
    dense, sparse = records(tmp_path / "dense"), records(tmp_path / "sparse")
    head = (D + 1) * 4                          # fedavgmf's shared w, b travel whole
    for rd, rs in zip(dense, sparse):
        assert rd["metrics"] == rs["metrics"] and rd["loss"] == rs["loss"]
        k = np.array([len(truth[rs["round"]][u]) for u in sorted(truth[rs["round"]])])
        per = 4 + k * (4 + D * 4) + head        # count + k * (index + row) + the rest
        up = rs["bytes"]["logical"]["train_up"]
        assert up == {"clients": 30, "mean": float(per.mean()), "max": int(per.max()),
                      "total": int(per.sum())}
        assert rd["bytes"]["logical"]["train_up"]["mean"] == I * D * 4 + head
        assert up["total"] < 0.75 * rd["bytes"]["logical"]["train_up"]["total"]
        assert rd["bytes"]["logical"]["train_down"] == rs["bytes"]["logical"]["train_down"]


def test_sparse_int8_bytes_and_error_bound(tmp_path, received):
    """sparse_int8: 4 + k (4 + d + 4) bytes of item table per client, and every decoded
    value within 1/254 of its row's largest change from the row sent."""
    from fedrpc.strategy import GFMFR
    run(tmp_path, "fed.workers=2", "fed.protocol=sparse_int8")
    head = (D + 1) * 4
    recs = records(tmp_path)
    for worker, req, reply in received:
        truth = training_items(worker, req)
        k = np.array([len(truth[int(u)]) for u in req.users])
        assert reply.client_bytes().tolist() == (4 + k * (4 + D + 4) + head).tolist()
    assert all(np.isfinite(r["metrics"]["test"]["HR@10"]) for r in recs)
    strategy = GFMFR(load_config(None, SMALL + ["fed.protocol=sparse_int8"]))
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(I, D, generator=gen)
    tables = base.repeat(3, 1, 1)
    tables[0, :5] += 0.01 * torch.randn(5, D, generator=gen)
    tables[2, 7] += 3.0 * torch.randn(D, generator=gen)
    rows = Rows.from_dense(tables, base)
    up = strategy.codec.encode({"Q": base}, {"Q": rows})["Q"]
    back = strategy.codec.decode({"Q": base}, {"Q": up}, 3)["Q"].dense()
    change = (tables - base).abs().amax(-1, keepdim=True)
    assert ((back - tables).abs() <= change / 254 + 1e-6).all()
    assert up.counts.tolist() == [5, 0, 1]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_precision_composes_with_both_protocols_whatever_the_workers(tmp_path, precision):
    """At any precision, an unchanged row re-encodes to exactly what was sent, so dense and
    sparse still give the same numbers; bytes per value are 2 in both directions."""
    run(tmp_path / "d", "fed.workers=1", f"fed.precision={precision}", "gfmfr.enabled=true")
    run(tmp_path / "s", "fed.workers=2", f"fed.precision={precision}", "gfmfr.enabled=true",
        "fed.protocol=sparse")
    run(tmp_path / "f", "fed.workers=1", "gfmfr.enabled=true")
    d, s, f = records(tmp_path / "d"), records(tmp_path / "s"), records(tmp_path / "f")
    shared = I * D + D + 1
    for rd, rs, rf in zip(d, s, f):
        assert rd["metrics"] == rs["metrics"]
        assert rd["loss"] == rs["loss"] and rd["loss"] != rf["loss"]    # the rounding is real
        down = shared * 2 + (I * 2 if rd["round"] >= 1 else 0)    # + g_k from round 1
        assert rd["bytes"]["logical"]["train_down"]["mean"] == down
        assert rs["bytes"]["logical"]["train_down"]["mean"] == down
        assert rf["bytes"]["logical"]["train_down"]["mean"] == 2 * down
        assert rd["bytes"]["logical"]["train_up"]["mean"] == shared * 2
        assert rd["bytes"]["logical"]["eval_down"]["mean"] == shared * 2
        up = rs["bytes"]["logical"]["train_up"]     # 4 + k (4 + 2 d) + the head at 2 bytes
        assert (up["max"] - 4 - (D + 1) * 2) % (4 + 2 * D) == 0
        assert up["mean"] < shared * 2
        for r in (rd, rs, rf):                          # the results stay usable
            assert r["metrics"]["test"]["HR@10"] > 0


def test_a_malformed_encoded_upload_is_rejected(tmp_path):
    for protocol, precision in (("dense", "fp32"), ("sparse", "fp16")):
        cfg = load_config(None, SMALL + [f"fed.protocol={protocol}",
                                         f"fed.precision={precision}"])
        strategy = GFMFR(cfg)
        shared = strategy.backbone.init_shared(50, 0)
        state = ServerState(dict(shared), np.full(10, -1))
        sent = strategy.sent(state)
        trained = {k: v.unsqueeze(0).repeat(2, *[1] * v.dim()) for k, v in sent.items()}
        trained["Q"][0, 3] += 0.5
        wide = TrainReply(0, np.array([2]), {k: v[:1].double() for k, v in trained.items()},
                          None)
        dense_q = trained["Q"]
        trained["Q"] = Rows.from_dense(dense_q, sent["Q"])
        good = TrainReply(0, np.array([0, 1]), strategy.codec.encode(sent, trained), None)
        admitted = strategy.admit(state, [good, wide], 0)
        assert admitted.rejected == {"shape_or_dtype": [2]}
        assert torch.equal(admitted.up.shared["Q"].dense()[1], sent["Q"])
        assert torch.equal(admitted.up.shared["Q"].dense()[0],
                           strategy.precision.round_trip(dense_q[0]))
        if protocol == "sparse":
            q = good.shared["Q"]
            assert q.counts.tolist() == [1, 0] and q.index.tolist() == [3]
            bad = SparseRows(q.counts, q.index + 50, q.values)      # a row out of range
            wrong = TrainReply(0, np.array([5, 6]), {**good.shared, "Q": bad}, None)
            assert strategy.admit(state, [wrong], 0).rejected == {"shape_or_dtype": [5, 6]}


# ---------------------------------------------------------------------- secagg
from fedrpc.strategy.secagg import (RING, SCALE_BITS, MaskedSums, MaskRequest, PublicKeys,
                                    SecAgg, from_ring, secure_sets, to_ring)
from fedrpc.strategy.precision import Precision


def test_secure_sets_never_hold_fewer_than_the_minimum():
    set_of, groups = secure_sets(np.array([0, 0, 0, 1, 2, 0]), 4, 2)
    assert groups == {0: [0], 4: [1, 2]}                  # the two singletons together
    assert set_of.tolist() == [0, 0, 0, 4, 4, 0]
    set_of, groups = secure_sets(np.array([0, 0, 1, 0, 0, 2]), 3, 3)
    assert groups == {0: [0, 1, 2]}                       # 1 + 2 < 3: into the largest
    assert set_of.tolist() == [0] * 6
    set_of, groups = secure_sets(np.array([1]), 2, 1)     # alone is never a set
    assert groups == {} and set_of.tolist() == [-1]


def _masked(tables: dict[int, torch.Tensor], hosts: list[list[int]], r: int = 7):
    """Phase 1 and 2 of one set for clients hosted as `hosts`: the workers' MaskedSums."""
    codecs = []
    keys = {}
    for hosted in hosts:
        c = SecAgg(Precision("fp32"), "Q")
        t = torch.stack([tables[u] for u in hosted])
        out = c.encode({"Q": t[0]}, {"Q": Rows.from_dense(t, t[0])})
        keys.update({u: k for u, k in zip(hosted, out["Q"].keys)})
        codecs.append(c)
    members = np.array(sorted(keys))
    key_t = torch.stack([keys[u] for u in members])
    out = []
    for c, hosted in zip(codecs, hosts):
        req = MaskRequest(r, np.array(hosted), np.zeros(len(hosted), np.int64), {0: members},
                          {0: key_t})
        out.append(c.masked_sums(req, np.array(hosted)))
    return out


def test_masks_cancel_exactly_and_one_masked_upload_is_independent_of_its_table():
    gen = torch.Generator().manual_seed(0)
    tables = {u: torch.randn(400, 16, generator=gen) for u in range(5)}
    plain = sum(to_ring(t) for t in tables.values()) % RING
    for hosts in ([[0], [1, 2], [3, 4]], [[0, 1, 2, 3, 4]], [[u] for u in range(5)]):
        sums = _masked(tables, hosts)
        total = sum(s.sums[0].to(torch.int64) for s in sums) % RING
        assert torch.equal(total, plain)                  # exact, whatever the packing
        got = from_ring(total)
        want = sum(t.double() for t in tables.values())
        assert (got - want).abs().max() <= 5 * 2.0 ** -(SCALE_BITS + 1)
    alone = _masked(tables, [[0], [1, 2, 3, 4]])[0].sums[0].double().flatten()
    x = tables[0].double().flatten()
    corr = float(torch.corrcoef(torch.stack([alone, x]))[0, 1])
    assert abs(corr) < 0.06                               # 6400 values: noise is ~0.0125
    clear = from_ring(to_ring(tables[0])).flatten()
    assert float(torch.corrcoef(torch.stack([clear, x]))[0, 1]) > 0.999
    # uniform on the ring: its top bit is a fair coin
    top = (alone.to(torch.int64) % RING >= RING // 2).double().mean()
    assert 0.45 < float(top) < 0.55


def test_secagg_the_server_sees_only_set_sums_and_the_attack_learns_nothing(tmp_path,
                                                                            received,
                                                                            monkeypatch):
    from fedrpc.strategy import GFMFR
    got_sums = {}
    orig = GFMFR.secure_aggregate

    def keep(self, state, replies, sets, failed, r):
        sums, rec = orig(self, state, replies, sets, failed, r)
        got_sums.setdefault(self.cfg.fed.workers, []).append(
            {s: (list(g), m.tolist(), v.clone()) for s, (g, m, v) in sums.items()})
        return sums, rec

    monkeypatch.setattr(GFMFR, "secure_aggregate", keep)
    seen = []
    orig_handle = Worker.handle

    def spy(self, msg):
        pending = None
        reply = orig_handle(self, msg)
        if isinstance(msg, TrainRequest):
            pending = self.codec.pending[0].dense()
        seen.append((self, msg, reply, pending))
        return reply

    monkeypatch.setattr(Worker, "handle", spy)
    run(tmp_path / "w3", "fed.workers=3", "fed.protocol=secagg", "fed.rounds=3")
    tables = {}                                 # (round, user) -> its plain trained table
    sent_q = {}                                 # round -> the table the server sent
    for worker, msg, reply, pending in seen:
        if isinstance(msg, TrainRequest):
            assert isinstance(reply.shared["Q"], PublicKeys)     # no table in phase 1
            sent_q[msg.round] = msg.shared["Q"]
            tables.update({(msg.round, int(u)): pending[j] for j, u in enumerate(msg.users)})
            truth = training_items(worker, msg)
            assert all(len(t) < I for t in truth.values())   # what dense/sparse reveal
        if isinstance(reply, MaskedSums):
            assert len(reply.sums) < len(reply.users)             # pre-added per set
            for s_sum in reply.sums:    # the attack: every row differs from what was sent
                changed = (from_ring(s_sum.to(torch.int64)).float() != sent_q[msg.round]
                           ).any(-1)
                assert changed.all() and len(changed) == I        # so it recovers nothing
    # each set's sum is the plain sum of its members' tables, within the resolution
    for r, sums in enumerate(got_sums[3]):
        for s, (groups, members, mean) in sums.items():
            plain = sum(tables[(r, u)].double() for u in members) / len(members)
            assert (mean - plain).abs().max() <= 2.0 ** -(SCALE_BITS + 1) + 1e-12
    run(tmp_path / "w1", "fed.workers=1", "fed.protocol=secagg", "fed.rounds=3")
    for a, b in zip(got_sums[1], got_sums[3]):                   # bit-identical
        assert a.keys() == b.keys()
        for s in a:
            assert a[s][:2] == b[s][:2] and torch.equal(a[s][2], b[s][2])
    ra, rb = records(tmp_path / "w1"), records(tmp_path / "w3")
    assert [(r["metrics"], r["loss"], r["secagg"]) for r in ra] == \
        [(r["metrics"], r["loss"], r["secagg"]) for r in rb]
    for rec in rb:                               # the byte formulas of both phases
        lg, sizes = rec["bytes"]["logical"], rec["secagg"]["set_sizes"]
        assert lg["train_up"]["mean"] == (D + 1) * 4 + 32        # heads + a public key
        assert lg["upload_up"]["mean"] == I * D * 4               # one masked table
        relay = sum(m * (m - 1) * (8 + 32) for m in sizes)        # others' ids and keys
        assert lg["upload_down"]["total"] == relay
        assert rec["bytes"]["physical"]["1->0"]["messages"] == 3   # train, upload, eval


def test_secagg_a_worker_lost_between_the_phases_abandons_its_sets(tmp_path, monkeypatch):
    orig = SecAgg.masked_sums

    def fail(self, req, hosted):
        if req.round == 1 and 1 in req.users.tolist():
            raise RuntimeError("worker lost between the phases")
        return orig(self, req, hosted)

    monkeypatch.setattr(SecAgg, "masked_sums", fail)
    run(tmp_path, "fed.workers=3", "fed.protocol=secagg", "fed.rounds=3",
        "runtime.on_worker_failure=skip")
    recs = records(tmp_path)
    assert recs[0]["secagg"]["abandoned_sets"] == 0
    lost = recs[1]["secagg"]
    assert 0 < lost["abandoned_sets"] <= lost["sets"] and lost["clients_abandoned"] > 0
    assert recs[1]["failures"][0]["rank"] == 2                   # user 1 lives on rank 2
    assert recs[2]["secagg"]["abandoned_sets"] == 0
