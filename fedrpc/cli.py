"""Command line: `fedrpc run | encode | data stats | baseline | bench train | bench round |
bench scale | diagnose teacher | diagnose content | config reference | report`
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


def _float_list(text: str, option: str) -> list[float]:
    """`0.002,0.005` -> [0.002, 0.005]; a one-line error for an empty list or a non-number."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ConfigError(f"{option}: empty list; give values like {option} 0.002,0.005")
    try:
        return [float(p) for p in parts if p]
    except ValueError:
        raise ConfigError(f"{option}: not a comma list of numbers: {text!r}") from None


def _mf_options(args) -> tuple[list[float], list[float]]:
    """The learning rates and weight decays of `baseline --model mf`: single values (or
    their defaults), or with --tune grids (default: the baselines' default grid)."""
    from .baselines import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS, _check_mf_args
    lrs = _float_list(args.lr, "--lr") if args.lr is not None else \
        (list(DEFAULT_LRS) if args.tune else [0.005])
    wds = _float_list(args.weight_decay, "--weight-decay") if args.weight_decay is not None \
        else (list(DEFAULT_WEIGHT_DECAYS) if args.tune else [1e-6])
    if not args.tune:
        for name, vals in (("--lr", lrs), ("--weight-decay", wds)):
            if len(vals) != 1:
                raise ConfigError(f"{name}: several values need --tune (a grid search); "
                                  f"without it give one value")
    _check_mf_args(args.epochs, lrs, wds)
    return lrs, wds


def format_grid(tune: dict, k: int) -> str:
    """The tuning grid as a text table: each point's best validation metric (NDCG@k
    unless --select) and its epoch, the chosen point marked *."""
    key = f"valid {tune.get('metric', f'NDCG@{k}')}"
    lines = [f"  {'lr':>8} {'weight_decay':>12} {'best epoch':>10} {key:>20}"]
    ch = tune["chosen"]
    for row in tune["grid"]:
        mark = " *" if (row["lr"], row["weight_decay"]) == (ch["lr"], ch["weight_decay"]) else ""
        lines.append(f"  {row['lr']:>8g} {row['weight_decay']:>12g} {row['best_epoch']:>10} "
                     f"{row[key]:>20.4f}{mark}")
    return "\n".join(lines)


def _cmd_baseline(args) -> int:
    from .baselines import (DEFAULT_ALPHAS, run_central_mf, run_content, run_popularity,
                            run_random, select_metric, tune_central_mf)
    from .metrics import COLD
    from .reporting import format_metrics, write_json
    if args.model not in ("mf", "content") and (args.tune or args.select is not None):
        raise ConfigError("--tune and --select apply to --model mf and --model content only")
    if args.model != "mf" and (args.lr is not None or args.weight_decay is not None):
        raise ConfigError("--lr and --weight-decay apply to --model mf only")
    if args.model != "content" and args.alpha is not None:
        raise ConfigError("--alpha applies to --model content only")
    lrs, wds = _mf_options(args) if args.model == "mf" else ([], [])
    alphas = (_float_list(args.alpha, "--alpha") if args.alpha is not None else
              (list(DEFAULT_ALPHAS) if args.tune else [0.0]))
    if args.model == "content" and len(alphas) != 1 and not args.tune:
        raise ConfigError("--alpha: several values need --tune (a grid search); without it "
                          "give one value")
    cfg = load_config(args.config, args.overrides)
    if args.model in ("mf", "content"):
        select_metric(cfg, args.select)
    if args.model == "content":
        result = {"model": args.model, **run_content(cfg, alphas, args.select)}
    elif args.model == "popularity":
        result = {"model": args.model, **run_popularity(cfg)}
    elif args.model == "random":
        result = {"model": args.model, "seed": cfg.run.seed, **run_random(cfg)}
    elif args.tune:
        result = {"model": args.model, **tune_central_mf(cfg, lrs, wds, args.epochs,
                                                         progress=cfg.run.progress,
                                                         select=args.select)}
    else:
        result = {"model": args.model, **run_central_mf(cfg, args.epochs, lrs[0],
                                                        weight_decay=wds[0],
                                                        select=args.select)}
    out = Path(cfg.run.out_dir)
    write_json(out / f"baseline_{args.model}.json", result)
    if args.model == "content" and "tune" in result:
        metric = result["tune"]["metric"]
        print(f"grid (validation {metric}; * = chosen):")
        for row in result["tune"]["grid"]:
            mark = " *" if row["alpha"] == result["alpha"] else ""
            print(f"  alpha {row['alpha']:>6g}  {row[f'valid {metric}']:.4f}{mark}")
    elif "tune" in result:
        k, metric = cfg.eval.ks[0], result["tune"]["metric"]
        print(f"grid (best validation {metric} within {args.epochs} epochs; * = chosen):")
        print(format_grid(result["tune"], k))
        if result["tune"]["constant"]:
            hint = (f"; select by {COLD}{metric} (--select {COLD}{metric})"
                    if cfg.data.split == "cold_items" and not metric.startswith(COLD) else "")
            print(f"warning: validation {metric} is the same at every grid point and epoch, "
                  f"so the choice says nothing{hint}", file=sys.stderr)
    for which in ("valid", "test"):
        print(f"{args.model} {which}: {format_metrics(result[which], cfg.eval.ks)}")
        cold = {m[len(COLD):]: v for m, v in result[which].items() if m.startswith(COLD)}
        if cold:
            print(f"{args.model} {which} {COLD} {format_metrics(cold, cfg.eval.ks)}")
    if args.model == "content":
        print(f"(content: {result['features']} features; popularity weight alpha "
              f"{result['alpha']:g})")
    if "best_round" in result:
        print(f"(test at the best validation {result['selected_by'].split(' ', 1)[1]} "
              f"epoch, {result['best_round']}; "
              f"lr {result['lr']:g}, weight decay {result['weight_decay']:g})")
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


def _cmd_diagnose_content(args) -> int:
    from .diagnostics import diagnose_content
    from .reporting import write_json
    cfg = load_config(args.config, args.overrides)
    try:
        records = diagnose_content(cfg, args.checkpoint, args.folds)
    except ValueError as e:                      # a bad --folds or --checkpoint
        print(f"fedrpc: error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.run.out_dir) / "content_diagnostics.json"
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
    bl.add_argument("--model", choices=["popularity", "mf", "random", "content"],
                    default="popularity",
                    help="popularity (the floor), mf: centralised matrix factorisation "
                         "(the ceiling), latent size fed.latent_dim, random: every item "
                         "scored by a seeded uniform draw per user (chance), or content: "
                         "each item's mean content similarity to the user's training "
                         "items, plus --alpha times its standardised log popularity")
    bl.add_argument("--alpha", default=None,
                    help="content: the popularity weight (default 0: content alone); with "
                         "--tune a comma list (default 0,0.5,1,2,4,8)")
    bl.add_argument("--epochs", type=int, default=30,
                    help="mf: training epochs; the test is read at the best validation "
                         "epoch (by --select)")
    bl.add_argument("--lr", default=None,
                    help="mf: Adam learning rate (default 0.005); with --tune a comma list "
                         "(default 0.002,0.005,0.02)")
    bl.add_argument("--weight-decay", default=None,
                    help="mf: Adam weight decay (default 1e-6); with --tune a comma list "
                         "(default 0,1e-5,1e-4)")
    bl.add_argument("--tune", action="store_true",
                    help="mf: grid search over --lr x --weight-decay, each point's epoch and "
                         "the point chosen by the validation metric (--select) alone; "
                         "content: the same over --alpha; the test is read at the chosen "
                         "point")
    bl.add_argument("--select", default=None, metavar="METRIC",
                    help="mf, content: the validation metric that picks the epoch and the "
                         "grid point "
                         "(default NDCG@K, K = eval.ks[0]; cold:NDCG@K with "
                         "data.split=cold_items, where an ID-only model ranks no cold item among "
                         "all items)"),
    bl.set_defaults(func=_cmd_baseline)
    dg = _command_group(sub, "diagnose", "diagnostics")
    dt = dg.add_parser("teacher", help="evaluate the group-fusion teacher and its variants "
                                       "as recommenders during an in-process run")
    _add_config_args(dt)
    dt.add_argument("--every", type=int, default=5, help="check every N rounds")
    dt.set_defaults(func=_cmd_diagnose_teacher)
    dc = dg.add_parser("content", help="how well the item content predicts what the "
                                       "interactions teach (cross-validated ridge R^2)")
    _add_config_args(dc)
    dc.add_argument("--checkpoint", default=None, metavar="DIR",
                    help="also the item table of this checkpoint folder "
                         "(run.out_dir/checkpoints/round-NNNNNN, same data and backbone)")
    dc.add_argument("--folds", type=int, default=5, help="cross-validation folds over items")
    dc.set_defaults(func=_cmd_diagnose_content)

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
