"""Draw docs/img/*.png from bench/out/*.json (matplotlib, Agg backend): latency distributions and throughput bars.

python -m bench.plots [--out bench/out] [--img docs/img]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench._common import IMG, OUT


def _load(out: Path, name: str) -> dict | None:
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _cdf(ax, label: str, values: list[float]) -> None:  # type: ignore[no-untyped-def]
    s = sorted(values)
    if not s:
        return
    ax.plot(s, [(i + 1) / len(s) * 100 for i in range(len(s))], label=label)


def _bars(path: Path, title: str, labels: list[str], values: list[float], ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(labels, values, color=["#888888"] + ["#1f77b4"] * (len(values) - 1))
    ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.2f}" for v in values], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    plt.setp(ax.get_xticklabels(), fontsize=8, rotation=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(out: Path = OUT, img: Path = IMG) -> list[Path]:
    img.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []

    if d := _load(out, "http_hot"):
        rows = d["rows"]
        p = img / "http_hot_rps.png"
        _bars(
            p,
            "HTTP hot path: req/s (wrk, median of rounds)",
            [r["server"] for r in rows],
            [r["req/s (median)"] for r in rows],
            "req/s",
        )
        made.append(p)
        pct = d["meta"].get("percentiles_ms", {})
        if pct:
            fig, ax = plt.subplots(figsize=(7, 3.6))
            for label, series in pct.items():
                xs = sorted(series, key=float)
                ax.plot([float(x) for x in xs], [series[x] for x in xs], marker=".", label=label)
            ax.set_xlabel("percentile")
            ax.set_ylabel("latency ms")
            ax.set_yscale("log")
            ax.set_title("HTTP hot path: latency percentiles (wrk)", fontsize=10)
            ax.legend()
            fig.tight_layout()
            p = img / "http_hot_latency.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            made.append(p)

    if d := _load(out, "scaling"):
        p = img / "scaling_rps.png"
        _bars(
            p,
            "Scaling on 2 cores: req/s",
            [f"{r['instances']} instance(s)" for r in d["rows"]],
            [r["req/s (median)"] for r in d["rows"]],
            "req/s",
        )
        made.append(p)

    if d := _load(out, "l1_hit"):
        rows = [r for r in d["rows"] if r["contender"] != "empty loop (reference)"]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh([r["contender"] for r in rows], [r["ns/read (best, net)"] for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("ns per read (log)")
        ax.set_title("In-process L1 hit", fontsize=10)
        plt.setp(ax.get_yticklabels(), fontsize=7)
        fig.tight_layout()
        p = img / "l1_hit.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    for name, xlabel, title in [
        ("l2_hit", "µs", "L2 hit latency (CDF)"),
        ("invalidation", "ms", "Invalidation propagation (CDF)"),
        ("writes", "ms", "Write latency (CDF)"),
        ("cached_vs_uncached", "ms", "Cached vs uncached (CDF)"),
        ("stampede", "ms", "Stampede: response time of 1000 concurrent requests (CDF)"),
    ]:
        if d := _load(out, name):
            fig, ax = plt.subplots(figsize=(7, 3.6))
            for label, vals in d["samples"].items():
                _cdf(ax, label, vals)
            ax.set_xscale("log")
            ax.set_xlabel(f"{xlabel} (log)")
            ax.set_ylabel("% of requests ≤ x")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7)
            fig.tight_layout()
            p = img / f"{name}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            made.append(p)

    if d := _load(out, "origin_amplification"):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        rows = d["rows"]
        xs = range(len(rows))
        w = 0.27
        for j, (col, color) in enumerate(
            [("no-cache loads", "#888888"), ("ideal loads", "#2ca02c"), ("our loads", "#1f77b4")]
        ):
            bars = ax.bar([x + (j - 1) * w for x in xs], [r[col] for r in rows], w, label=col, color=color)
            ax.bar_label(bars, fontsize=7)
        ax.set_xticks(list(xs), [r["origin"] for r in rows], fontsize=8)
        ax.set_ylabel("origin loads")
        ax.set_title(d["title"], fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = img / "origin_amplification.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    if d := _load(out, "memory"):
        rows = d["rows"]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        xs = range(len(rows))
        ax.bar(
            [x - 0.2 for x in xs],
            [r["payload B/entry"] for r in rows],
            0.4,
            label="payload (key + body)",
            color="#888888",
        )
        ax.bar([x + 0.2 for x in xs], [r["L1 B/entry (incl. key+body objects)"] for r in rows], 0.4, label="held by L1")
        ax.set_xticks(list(xs), [r["data type"] for r in rows], fontsize=8)
        ax.set_ylabel("bytes per entry")
        ax.set_title(d["title"], fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = img / "memory.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--img", default=str(IMG))
    a = p.parse_args(argv)
    made = draw(Path(a.out), Path(a.img))
    for m in made:
        print(m)
    return made


if __name__ == "__main__":
    main()
