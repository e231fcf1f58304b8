"""`fedrpc report RUN_DIR [RUN_DIR ...]`: compare runs from their rounds.jsonl.

Writes into the output folder: rounds.csv (one row per run and round, every figure taken
from the byte ledger's records as the run wrote them), one PNG per plot, and report.html,
self-contained (the PNGs embedded as data URIs, no external resources: it opens offline).

Per client, down and up are the sums over message kinds (train, eval, and secagg's
upload phase) of the mean logical bytes per participating client.

Plots: test/valid HR@K and NDCG@K over rounds; logical MB per client down/up per round
and cumulative; physical MB per rank pair per round; test HR@K against cumulative MB per
client (the communication-efficiency curve); seconds by phase; group sizes over rounds.
"""
from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

MB = 1e6
PHASES = ("train", "aggregate", "group", "upload", "fusion", "eval")


def load_run(folder: Path) -> list[dict]:
    path = Path(folder) / "rounds.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run folder (no rounds.jsonl)")
    recs = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in recs if "bytes" in r]           # failure lines carry no round data


def _logical(rec: dict, key: str, field: str = "mean") -> float:
    return rec["bytes"]["logical"].get(key, {}).get(field, 0)


def rows(name: str, recs: list[dict], k: int) -> list[dict]:
    """The CSV rows of one run: ledger figures as recorded, cumulative sums over rounds."""
    out, cum = [], 0.0
    for rec in recs:
        phys = rec["bytes"]["physical"]
        into = sum(p["payload"] for pair, p in phys.items() if pair.endswith("->0"))
        out_of = sum(p["payload"] for pair, p in phys.items() if pair.startswith("0->"))
        lg = rec["bytes"]["logical"]        # every kind (secagg adds its "upload" phase)
        down = sum(v["mean"] for k, v in lg.items() if k.endswith("_down"))
        up = sum(v["mean"] for k, v in lg.items() if k.endswith("_up"))
        cum += down + up
        row = {"run": name, "round": rec["round"], "clients": rec.get("clients", 0),
               "client_down_B": down, "client_up_B": up, "client_train_down_B":
               _logical(rec, "train_down"), "client_eval_down_B": _logical(rec, "eval_down"),
               "client_cumulative_B": cum, "physical_into_server_B": into,
               "physical_out_of_server_B": out_of,
               "physical_wire_total_B": rec["bytes"]["physical_total"].get("wire"),
               "loss": rec.get("loss", {}).get("base")}
        for split in ("valid", "test"):
            m = rec.get("metrics", {}).get(split, {})
            row[f"{split}_HR@{k}"] = m.get(f"HR@{k}")
            row[f"{split}_NDCG@{k}"] = m.get(f"NDCG@{k}")
        for ph in PHASES:
            row[f"seconds_{ph}"] = rec.get("seconds", {}).get(ph, 0.0)
        row["group_sizes"] = " ".join(map(str, rec.get("gfmfr", {}).get("group_sizes", [])))
        row["pairs"] = {pair: p["payload"] for pair, p in phys.items()}
        out.append(row)
    return out


def _k_of(recs: list[dict]) -> int:
    for r in recs:
        if "metrics" in r:
            ks = [int(key.split("@")[1]) for key in r["metrics"]["test"] if key.startswith("HR@")]
            return 50 if 50 in ks else max(ks)
    return 50


def _plots(runs: dict[str, list[dict]], k: int, out: Path) -> list[tuple[str, Path]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    made = []

    def save(fig, name: str, title: str) -> None:
        for ax in fig.axes:                 # rounds are whole numbers
            if ax.get_xlabel() == "round":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")   # legends sit below the axes
        plt.close(fig)
        made.append((title, path))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rs in runs.items():
        ev = [r for r in rs if r[f"test_HR@{k}"] is not None]
        for ax, m in zip(axes, ("HR", "NDCG")):
            ax.plot([r["round"] for r in ev], [r[f"test_{m}@{k}"] for r in ev], label=name)
            ax.plot([r["round"] for r in ev], [r[f"valid_{m}@{k}"] for r in ev], ls=":",
                    color=ax.lines[-1].get_color())
    for ax, m in zip(axes, ("HR", "NDCG")):
        ax.set(xlabel="round", ylabel=f"{m}@{k}", title=f"{m}@{k}: test (solid), valid (dotted)")
        _legend(ax)
    save(fig, "metrics", f"Test and validation HR@{k} / NDCG@{k} over rounds")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rs in runs.items():
        x = [r["round"] for r in rs]
        l, = axes[0].plot(x, [r["client_up_B"] / MB for r in rs], label=f"{name} up")
        axes[0].plot(x, [r["client_down_B"] / MB for r in rs], ls="--", color=l.get_color(),
                     label=f"{name} down")
        axes[1].plot(x, [r["client_cumulative_B"] / MB for r in rs], label=name)
    axes[0].set(xlabel="round", ylabel="MB per client", title="Logical MB per client per round")
    axes[1].set(xlabel="round", ylabel="MB per client",
                title="Cumulative logical MB per client (down + up)")
    for ax in axes:
        _legend(ax)
    save(fig, "bytes_per_client", "Logical bytes per client (what a device sends/receives)")

    fig, ax = plt.subplots(figsize=(11, 4))
    for name, rs in runs.items():
        for pair in sorted(rs[0]["pairs"]):
            ax.plot([r["round"] for r in rs], [r["pairs"].get(pair, 0) / MB for r in rs],
                    label=f"{name} {pair}")
    ax.set(xlabel="round", ylabel="MB (payload)", title="Physical MB per rank pair per round")
    _legend(ax, 4)
    save(fig, "physical", "Physical bytes per rank pair (what crossed between ranks)")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in runs.items():
        ev = [r for r in rs if r[f"test_HR@{k}"] is not None]
        ax.plot([r["client_cumulative_B"] / MB for r in ev], [r[f"test_HR@{k}"] for r in ev],
                marker=".", label=name)
    ax.set(xlabel="cumulative MB per client", ylabel=f"test HR@{k}",
           title="Communication efficiency")
    _legend(ax)
    save(fig, "efficiency", f"Test HR@{k} against cumulative MB per client")

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(runs) + 1.5))
    names = list(runs)
    left = [0.0] * len(names)
    for ph in PHASES:
        vals = [sum(r[f"seconds_{ph}"] for r in runs[n]) / max(len(runs[n]), 1) for n in names]
        ax.barh(names, vals, left=left, label=ph)
        left = [a + b for a, b in zip(left, vals)]
    ax.set(xlabel="seconds per round (mean)", title="Seconds by phase")
    _legend(ax, len(PHASES))
    save(fig, "seconds", "Seconds per round by phase")

    grouped = {n: rs for n, rs in runs.items() if any(r["group_sizes"] for r in rs)}
    if grouped:
        fig, ax = plt.subplots(figsize=(11, 4))
        for name, rs in grouped.items():
            sizes = [list(map(int, r["group_sizes"].split())) for r in rs]
            for g in range(max(len(s) for s in sizes)):
                ax.plot([r["round"] for r in rs], [s[g] if g < len(s) else 0 for s in sizes],
                        label=f"{name} group {g}")
        ax.set(xlabel="round", ylabel="clients", title="Group sizes over rounds")
        _legend(ax, 3)
        save(fig, "groups", "Group sizes over rounds")
    return made


def _legend(ax, ncol=2) -> None:
    """The legend below the axes, never over the curves (runs with identical numbers
    draw on top of each other: the legend still names each)."""
    ax.legend(fontsize=7, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              frameon=False)


def _table(runs: dict[str, list[dict]], k: int) -> str:
    head = ["run", "rounds", f"best test HR@{k}", f"best test NDCG@{k}",
            "MB/client down per round", "MB/client up per round",
            "MB into server per round", "cumulative MB/client"]
    body = []
    for name, rs in runs.items():
        ev = [r for r in rs if r[f"test_HR@{k}"] is not None]
        best = max(ev, key=lambda r: (r[f"valid_NDCG@{k}"], -r["round"])) if ev else None
        n = len(rs)
        cells = [name, n, best and f"{best[f'test_HR@{k}']:.4f}",
                 best and f"{best[f'test_NDCG@{k}']:.4f}",
                 f"{sum(r['client_down_B'] for r in rs) / n / MB:.4f}",
                 f"{sum(r['client_up_B'] for r in rs) / n / MB:.4f}",
                 f"{sum(r['physical_into_server_B'] for r in rs) / n / MB:.3f}",
                 f"{rs[-1]['client_cumulative_B'] / MB:.3f}"]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join(body) + "</table>")


def write_report(folders: list[Path], out: Path) -> Path:
    """rounds.csv, the PNGs and report.html for the runs in `folders`, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    loaded = {Path(f).name or str(f): load_run(Path(f)) for f in folders}
    if len(set(loaded)) != len(folders):
        loaded = {str(f): load_run(Path(f)) for f in folders}   # same names: full paths
    k = _k_of(next(iter(loaded.values())))
    runs = {name: rows(name, recs, k) for name, recs in loaded.items()}
    fields = [f for f in next(iter(runs.values()))[0] if f != "pairs"] if any(
        runs.values()) else []
    with open(out / "rounds.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for rs in runs.values():
            w.writerows(rs)
    figures = _plots(runs, k, out)
    imgs = "".join(
        f"<h2>{html.escape(title)}</h2><img alt=\"{html.escape(title)}\" src=\"data:image/png;"
        f"base64,{base64.b64encode(p.read_bytes()).decode()}\">" for title, p in figures)
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>fedrpc report</title>"
            f"<style>body{{font-family:sans-serif;max-width:1250px;margin:2em auto}}"
            f"table{{border-collapse:collapse}}td,th{{border:1px solid #bbb;padding:4px 8px;"
            f"text-align:right}}img{{max-width:100%}}</style></head><body>"
            f"<h1>fedrpc report: {len(runs)} run(s)</h1>"
            f"<p>Logical bytes: what each participating client device sends/receives (mean "
            f"per client; down = train + eval). Physical: payload bytes between ranks. Test "
            f"metrics at the round with the best valid NDCG@{k}. Per-round figures are in "
            f"rounds.csv beside this file.</p>{_table(runs, k)}{imgs}</body></html>")
    (out / "report.html").write_text(page)
    return out / "report.html"
