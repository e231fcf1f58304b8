"""Evaluation on the workers while the server groups and fuses (runtime.overlap_eval):
it does overlap, and every number of the run stays what it is without the overlap."""
import json
import threading

import pytest

import fedrpc.algorithms as alg
from fedrpc.config import load_config
from fedrpc.runtime import run_local
from fedrpc.worker import Worker
from launch import SMALL as LAUNCH_SMALL

SMALL = [*LAUNCH_SMALL, "fed.workers=2"]
WAIT_S = 10.0


def run(out, *over):
    return run_local(load_config(None, SMALL + [f"run.out_dir={out}", *over]))


def records(out):
    return [json.loads(l) for l in open(out / "rounds.jsonl")]


@pytest.fixture
def rendezvous(monkeypatch):
    """Evaluation and fusion each wait (bounded) for the other to have started; records
    whether each saw the other start."""
    eval_started, fusion_started = threading.Event(), threading.Event()
    met = {"eval": [], "fusion": []}
    handle, train_fusion = Worker.handle, alg.train_fusion

    def eval_side(self, msg):
        if type(msg).__name__ == "TrainRequest":       # a new round
            eval_started.clear(), fusion_started.clear()
        if type(msg).__name__ == "EvalRequest":
            eval_started.set()
            met["eval"].append(fusion_started.wait(WAIT_S))
        return handle(self, msg)

    def fusion_side(*a, **kw):
        fusion_started.set()
        met["fusion"].append(eval_started.wait(WAIT_S))
        return train_fusion(*a, **kw)

    monkeypatch.setattr(Worker, "handle", eval_side)
    monkeypatch.setattr(alg, "train_fusion", fusion_side)
    return met


@pytest.mark.timeout(120)
def test_workers_evaluate_while_the_server_fuses(tmp_path, rendezvous):
    run(tmp_path, "fed.rounds=2")
    # every round: 2 workers evaluate, fusion runs once, and each saw the other under way
    assert rendezvous["fusion"] == [True, True]
    assert rendezvous["eval"] == [True] * 4


@pytest.mark.timeout(120)
def test_no_overlap_when_fusion_changes_the_evaluated_model(tmp_path, rendezvous):
    """gfmfr.content_prior moves the shared table after fusion: evaluation must wait."""
    run(tmp_path, "fed.rounds=1", "gfmfr.content_prior=0.5")
    assert rendezvous["fusion"] == [False]


@pytest.mark.parametrize("prior", ["0", "0.5"])
def test_overlap_changes_no_number(tmp_path, prior):
    run(tmp_path / "on", f"gfmfr.content_prior={prior}")
    run(tmp_path / "off", f"gfmfr.content_prior={prior}", "runtime.overlap_eval=false")
    on, off = records(tmp_path / "on"), records(tmp_path / "off")
    for key in ("metrics", "loss", "bytes", "gfmfr", "clients"):
        assert [r[key] for r in on] == [r[key] for r in off], key
