"""Command line: `fedrpc run | encode | data stats | baseline | bench train | bench round |
bench scale | diagnose teacher | config reference | report`
(also `python -m fedrpc`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, config_reference, load_config
from .data.types import DataError

log = logging.getLogger("fedrpc")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (e.g. configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, e.g. fed.rounds=3 data.path=/data/ml-100k")


def _cmd_data_stats(args) -> int:
    from .data import data_stats
    cfg = load_config(args.config, args.overrides)
    stats = data_stats(cfg)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    split = stats.pop("split")
    content = stats.pop("content")
    print(f"data: {cfg.data.format} {cfg.data.path or '(generated)'}")
    for k, v in stats.items():
        print(f"  {k:<28} {v:,}" if isinstance(v, int) else f"  {k:<28} {v}")
    print("split (" + cfg.data.split + "):")
    for k, v in split.items():
        print(f"  {k:<28} {v:,}")
    print("content:")
    for k, v in content.items():
        print(f"  {k:<28} {v:,}")
    return 0


def _cmd_baseline(args) -> int:
    from .baselines import run_central_mf, run_popularity
    from .reporting import format_metrics, write_json
    cfg = load_config(args.config, args.overrides)
    if args.model == "popularity":
        result = {"model": args.model, **run_popularity(cfg)}
    else:
        result = {"model": args.model, **run_central_mf(cfg, args.epochs, args.lr)}
    out = Path(cfg.run.out_dir)
    write_json(out / f"baseline_{args.model}.json", result)
    for which in ("valid", "test"):
        print(f"{args.model} {which}: {format_metrics(result[which], cfg.eval.ks)}")
    if "best_round" in result:
        print(f"(test at the best validation epoch, {result['best_round']})")
    print(f"written: {out / f'baseline_{args.model}.json'}")
    return 0


EXIT_STOPPED = 75   # stopped by a signal after a checkpoint: run again with run.resume=auto


def _cmd_run(args) -> int:
    from .reporting import format_metrics
    from .runtime import RunError, run
    from .server import RoundFailed, Stopped
    from .transport import WorkerError
    cfg = load_config(args.config, args.overrides)
    try:
        summary = run(cfg)
    except (RunError, RoundFailed, WorkerError) as e:   # a rank failed; the message names it
        print(f"fedrpc: error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        print(f"fedrpc: {e}; continue with: fedrpc run {args.config} "
              f"{' '.join(args.overrides)} run.resume=auto".rstrip(), file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("fedrpc: interrupted (no checkpoint written for the current round)",
              file=sys.stderr)
        return 130
    if summary is None:         # a worker rank: the server reports
        return 0
    k = cfg.eval.ks
    if "test" in summary:
        print(f"best round {summary['best_round']} (by {summary['selected_by']}): "
              f"test {format_metrics(summary['test'], k)}")
    print(f"written: {Path(cfg.run.out_dir) / 'rounds.jsonl'}, "
          f"{Path(cfg.run.out_dir) / 'summary.json'}")
    return 0


def _cmd_encode(args) -> int:
    from .encoders.cli import run_encode
    cfg = load_config(args.config, args.overrides)
    run_encode(cfg)
    return 0


def _cmd_bench(args) -> int:
    from .bench import bench_train
    cfg = load_config(args.config, args.overrides)
    r = bench_train(cfg, args.clients, args.repeats)
    print(f"local training, one round, {r['clients']} clients, {r['local_epochs']} local "
          f"epochs, {r['threads']} threads:")
    print(f"  batched across clients          {r['batched_s']:8.2f} s")
    print(f"  one client at a time (same code) {r['one_by_one_s']:8.2f} s   "
          f"{r['speedup_vs_one_by_one']:.1f}x")
    print(f"  straightforward per-user loop    {r['straightforward_s']:8.2f} s   "
          f"{r['speedup_vs_straightforward']:.1f}x")
    w = r["workload"]
    print(f"work: {w['sample_steps']:,} sample-steps in {w['slots']:,} minibatch slots "
          f"({w['steps']:,} client steps); {w['matmul_gflop']} GFLOP of matrix products, "
          f"{w['bmm_gflops']} GFLOPS measured for torch.bmm at these shapes -> "
          f"{w['matmul_floor_s']} s for the products alone")
    return 0


def _cmd_bench_scale(args) -> int:
    from .bench_scale import bench_scale, format_report
    from .reporting import write_json
    overrides = list(args.overrides) + ([f"fed.backbone={args.backbone}"] if args.backbone else [])
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        workers = []
    if not workers or min(workers) < 1:
        print(f"fedrpc: error: --workers: a comma-separated list of positive counts, got "
              f"{args.workers!r}", file=sys.stderr)
        return 2
    try:
        r = bench_scale(args.config, overrides, args.users, args.items,
                        args.mean_interactions, workers, args.transport,
                        Path(args.out) if args.out else None, args.timeout)
    except RuntimeError as e:
        print(f"fedrpc: error: {e}", file=sys.stderr)
        return 1
    print(format_report(r))
    write_json(Path(r["out"]) / "scale.json", r)
    print(f"written: {Path(r['out']) / 'scale.json'}")
def _cmd_bench_round(args) -> int:
    from .bench import bench_round
    cfg = load_config(args.config, [*args.overrides, "run.progress=false"])
    r = bench_round(cfg, max(1, args.rounds), not args.no_profile, args.top)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"round {r['round']}, {r['clients']} clients, {r['threads']} threads; "
          f"torch.mm {r['gemm_gflops']} GFLOPS, memory read {r['read_gbps']} GB/s")
    print(f"  {'phase':<10} {'seconds':>8} {'GFLOP':>8} {'MB':>8} {'floor s':>8} {'ratio':>7}")
    for ph, p in r["phases"].items():
        ratio = f"{p['ratio']:.1f}" if p["ratio"] is not None else "-"
        print(f"  {ph:<10} {p['seconds']:8.3f} {p['gflop']:8.2f} {p['mbytes']:8.1f} "
              f"{p['floor_s']:8.3g} {ratio:>7}")
    print(f"  {'total':<10} {r['total_s']:8.3f}")
    if "gfmfr" in r:
        gf = r["gfmfr"]
        print(f"groups {gf.get('group_sizes')}, fusion loss {gf.get('fusion_loss')}, "
              f"{gf.get('fusion_epochs')} fusion epochs, {gf.get('pca_components')} PCA dims")
    if "test" in r:
        print("test " + ", ".join(f"{k} {v:.4f}" for k, v in r["test"].items()))
    for ph, ops in r.get("top_ops", {}).items():
        print(f"top operators by self CPU time, {ph} (a profiled extra round):")
        for o in ops:
            print(f"    {o['self_ms']:9.1f} ms {o['calls']:7d}x  {o['op']}")
    return 0


def _cmd_diagnose_teacher(args) -> int:
    from .diagnostics import diagnose_teacher
    from .reporting import write_json
    cfg = load_config(args.config, [*args.overrides, "run.progress=false"])
    records = diagnose_teacher(cfg, max(1, args.every))
    out = Path(cfg.run.out_dir) / "teacher_diagnostics.json"
    write_json(out, records)
    print(f"written: {out}")
    return 0


def _cmd_report(args) -> int:
    from .report import write_report
    try:
        page = write_report([Path(f) for f in args.runs], Path(args.out))
    except FileNotFoundError as e:
        print(f"fedrpc: error: {e}", file=sys.stderr)
        return 2
    print(f"written: {page} (+ rounds.csv and the PNGs beside it)")
    return 0


def _command_group(sub, name: str, help: str):
    """`fedrpc NAME SUBCOMMAND ...`: a command whose subcommands are required."""
    return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedrpc", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    rn = sub.add_parser("run", help="run a federation (server + workers)")
    _add_config_args(rn)
    rn.set_defaults(func=_cmd_run)

    en = sub.add_parser("encode", help="encode item content into features (cached)")
    _add_config_args(en)
    en.set_defaults(func=_cmd_encode)

    data = _command_group(sub, "data", "inspect a dataset")
    st = data.add_parser("stats", help="users, items, interactions, split sizes, content")
    _add_config_args(st)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_cmd_data_stats)

    bl = sub.add_parser("baseline", help="evaluate a non-federated reference model")
    _add_config_args(bl)
    bl.add_argument("--model", choices=["popularity", "mf"], default="popularity",
                    help="popularity (the floor) or mf: centralised matrix factorisation "
                         "(the ceiling), latent size fed.latent_dim")
    bl.add_argument("--epochs", type=int, default=30, help="mf: training epochs")
    bl.add_argument("--lr", type=float, default=0.005, help="mf: Adam learning rate")
    bl.set_defaults(func=_cmd_baseline)
    dg = _command_group(sub, "diagnose", "diagnostics")
    dt = dg.add_parser("teacher", help="evaluate the group-fusion teacher and its variants "
                                       "as recommenders during an in-process run")
    _add_config_args(dt)
    dt.add_argument("--every", type=int, default=5, help="check every N rounds")
    dt.set_defaults(func=_cmd_diagnose_teacher)

    cf = _command_group(sub, "config", "the configuration keys")
    cr = cf.add_parser("reference", help="every key, its default and meaning (Markdown)")
    cr.set_defaults(func=lambda args: print(config_reference(), end="") or 0)

    rp = sub.add_parser("report", help="compare runs: report.html (self-contained), the "
                                       "PNGs, rounds.csv")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (run.out_dir)")
    rp.add_argument("--out", default="report", help="output folder (default: ./report)")
    rp.set_defaults(func=_cmd_report)

    bn = _command_group(sub, "bench", "benchmarks that print their figures")
    bt = bn.add_parser("train", help="one round of local training: batched vs one client "
                                     "at a time vs a straightforward per-user loop")
    _add_config_args(bt)
    bt.add_argument("--clients", type=int, default=0, help="first N clients (0 = all)")
    bt.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    bt.set_defaults(func=_cmd_bench)
    bs = bn.add_parser("scale", help="one round with every client on generated data of a "
                                     "given size, per worker count: seconds per phase, "
                                     "sample-steps/s, peak RSS per rank, bytes")
    bs.add_argument("config", nargs="?", default="configs/scale.yaml",
                    help="YAML config (default: configs/scale.yaml)")
    bs.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="dotted overrides, applied after the sizes")
    bs.add_argument("--users", type=int, default=2000, help="synthetic users (clients)")
    bs.add_argument("--items", type=int, default=2000, help="synthetic items")
    bs.add_argument("--mean-interactions", type=int, default=50,
                    help="mean interactions per user")
    bs.add_argument("--workers", default="1", help="worker counts, e.g. 1,2,4")
    bs.add_argument("--backbone", default="", help="fed.backbone (default: the config's)")
    bs.add_argument("--transport", choices=["rpc", "local"], default="rpc",
                    help="rpc: a process per rank on 127.0.0.1, RSS per rank (default); "
                         "local: one process, server and workers together")
    bs.add_argument("--out", default="", help="folder for the runs (default: a temp folder)")
    bs.add_argument("--timeout", type=float, default=1800.0,
                    help="hard limit in seconds per worker count; its processes are killed")
    bs.set_defaults(func=_cmd_bench_scale)
    br = bn.add_parser("round", help="whole rounds in this process: seconds per phase, its "
                                     "arithmetic floor and the ratio; top operators per phase")
    _add_config_args(br)
    br.add_argument("--rounds", type=int, default=2,
                    help="rounds to run; the last is reported (round 0 has no teacher)")
    br.add_argument("--top", type=int, default=8, help="operators per phase in the profile")
    br.add_argument("--no-profile", action="store_true",
                    help="skip the extra profiled round")
    br.add_argument("--json", action="store_true", help="print JSON")
    br.set_defaults(func=_cmd_bench_round)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow the options: `baseline CFG --model mf fed.latent_dim=32`
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"fedrpc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
