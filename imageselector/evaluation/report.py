"""Presenting evaluation results: the terminal table, the Markdown report and its bar chart (drawn with Pillow).

matplotlib is not a dependency; the chart is a plain horizontal bar chart with confidence whiskers.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from imageselector.evaluation.metrics import METRIC_LABELS, METRICS
from imageselector.fsutil import atomic_write_bytes, atomic_write_text

CHART_METRICS = ("listing_r10", "listing_map10", "image_map10")
CHART_COLOURS = {"listing_r10": (70, 130, 180), "listing_map10": (46, 139, 87), "image_map10": (218, 165, 32)}
# Drop-one verdict: a model whose removal lowers listing mAP@10 by less than this (upper CI bound) adds nothing.
NEGLIGIBLE = 0.005


def _fmt(stat: Mapping[str, float] | None, ci: str = "pm") -> str:
    if not stat or not _finite(stat.get("mean")):
        return "-"
    m, lo, hi = stat["mean"], stat["lo"], stat["hi"]
    if ci == "pm":
        return f"{m:.3f}±{max(m - lo, hi - m):.3f}"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def _neg(x: float) -> float:
    """-x without printing -0.000."""
    return 0.0 - x


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def verdict(delta: Mapping[str, float], cost: Mapping[str, Any] | None, costs: Mapping[str, Any]) -> str:
    """What the drop-one figures say about keeping a model (see docs/evaluation.md)."""
    if delta["hi"] < 0:
        return "hurts the ensemble: drop it or lower its weight"
    if delta["hi"] < NEGLIGIBLE:
        share = ""
        total = sum(c["sec_per_image"] for c in costs.values())
        if cost and total > 0:
            share = f" ({100 * cost['sec_per_image'] / total:.0f}% of embedding time)"
        return "adds no measurable recall: candidate to drop" + share
    if delta["lo"] > 0:
        return "adds recall"
    return "unclear: evaluate more listings (--sample)"


def _weights_status(w: Mapping[str, Any]) -> list[str]:
    if w.get("written"):
        return [f"Fitted RRF weights written to {w['written']}: search uses them from its next query."]
    if w.get("not_written"):
        return [f"Fitted weights NOT written: {w['not_written']}."]
    return []


def render_table(results: Mapping[str, Any]) -> str:
    q = results["queries"]
    lines = [
        f"Retrieval quality: {q['eval']} query listings (of {results['eligible_listings']} eligible; "
        f"{q['fit']} more used to fit weights), seed {results['options']['seed']}; mean ±95% CI half-width",
    ]
    if any(m.get("standin") for m in results["models"].values()):
        lines.append("WARNING: stand-in models with random weights: the figures say nothing about real models")
    head = f"{'method':<24}" + "".join(f"{METRIC_LABELS[m]:>14}" for m in METRICS) + f"{'ms/query':>10}"
    lines += ["", head, "-" * len(head)]
    for row in results["methods"]:
        lines.append(
            f"{row['name']:<24}"
            + "".join(f"{_fmt(row['metrics'][m]):>14}" for m in METRICS)
            + f"{row.get('query_ms', float('nan')):>10.2f}"
        )
    if results["ablation"]:
        costs = results["costs"]
        lines += ["", "Drop one model from the RRF ensemble (change in listing mAP@10 when dropped, 95% CI):"]
        lines.append(f"{'model':<16}{'Δ L mAP@10':>20}{'s/image':>10}{'h per 1M':>10}  verdict")
        for a in results["ablation"]:
            c = costs.get(a["model"])
            s = a["delta"]["listing_map10"]  # full minus without: the sign is flipped to read "when dropped"
            lines.append(
                f"{a['model']:<16}{_neg(s['mean']):>+9.3f} [{_neg(s['hi']):+.3f},{_neg(s['lo']):+.3f}]"
                f"{(c['sec_per_image'] if c else float('nan')):>10.3f}{(c['hours_per_million'] if c else float('nan')):>10.1f}"
                f"  {verdict(s, c, costs)}"
            )
    w = results["weights"]
    if w["fitted_on"]:
        lines += ["", f"Fitted weights (on {w['fitted_on']} held-out listings, maximising listing mAP@10):"]
        for method, ws in w["fitted"].items():
            lines.append(f"  {method}: " + ", ".join(f"{m}={v:g}" for m, v in ws.items()))
    lines.append(
        f"Weights in force for search: {w['in_force_source']}"
        + (": " + ", ".join(f"{m}={v:g}" for m, v in w["in_force"].items()) if w["in_force"] else "")
    )
    lines += _weights_status(w)
    if not results["costs"]:
        lines.append("Embedding cost: not recorded by embed.py yet; run with --measure-cost to measure it here.")
    return "\n".join(lines)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def draw_chart(results: Mapping[str, Any], path: Path) -> Path:
    """Horizontal bars (listing R@10, listing mAP@10, image mAP@10) per method, with 95% CI whiskers."""
    rows = results["methods"]
    bar_h, gap, left, right, top = 9, 10, 190, 40, 60
    group_h = bar_h * len(CHART_METRICS) + gap
    width = 900
    plot_w = width - left - right
    height = top + group_h * len(rows) + 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    q = results["queries"]
    d.text((10, 10), f"Retrieval quality on {q['eval']} query listings (95% CI)", fill="black", font=font)
    x = left
    for m in CHART_METRICS:
        d.rectangle([x, 36, x + 12, 46], fill=CHART_COLOURS[m])
        d.text((x + 16, 34), METRIC_LABELS[m], fill="black", font=small)
        x += 120
    for t in range(0, 11, 2):  # gridlines at 0, 0.2, ... 1.0
        gx = left + plot_w * t / 10
        d.line([gx, top - 4, gx, height - 40], fill=(225, 225, 225))
        d.text((gx - 8, height - 36), f"{t / 10:.1f}", fill="black", font=small)
    for i, row in enumerate(rows):
        y0 = top + i * group_h
        d.text((10, y0 + 6), row["name"][:26], fill="black", font=small)
        for j, m in enumerate(CHART_METRICS):
            st = row["metrics"].get(m)
            if not st or not _finite(st.get("mean")):
                continue
            y = y0 + j * bar_h
            d.rectangle([left, y, left + plot_w * st["mean"], y + bar_h - 2], fill=CHART_COLOURS[m])
            lo, hi = left + plot_w * st["lo"], left + plot_w * st["hi"]
            mid = y + (bar_h - 2) / 2
            d.line([lo, mid, hi, mid], fill="black")
            d.line([lo, y + 1, lo, y + bar_h - 3], fill="black")
            d.line([hi, y + 1, hi, y + bar_h - 3], fill="black")

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def render_markdown(results: Mapping[str, Any], chart_name: str) -> str:
    q = results["queries"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results["generated_at"]))
    out = [
        "# Retrieval quality report",
        "",
        f"Generated {when} from `{results['home']}` in {results['elapsed_s']:.1f} s. "
        f"{q['eval']} query listings evaluated (sampled from {results['eligible_listings']} listings with two or "
        f"more images embedded by every model; seed {results['options']['seed']}), {q['fit']} more held out to fit "
        "fusion weights. Each query is one image of a listing; the listing's other images are the relevant set. "
        "Figures are means with 95% bootstrap confidence intervals over query listings. "
        "How to read this: docs/evaluation.md.",
        "",
    ]
    if any(m.get("standin") for m in results["models"].values()):
        out += ["> **Stand-in models with random weights**: these figures test the machinery, not the models.", ""]
    out += [f"![recall chart]({chart_name})", "", "## Quality", ""]
    out.append("| method | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " | ms/query |")
    out.append("|---|" + "---|" * (len(METRICS) + 1))
    for row in results["methods"]:
        out.append(
            f"| {row['name']} | "
            + " | ".join(_fmt(row["metrics"][m], "ci") for m in METRICS)
            + f" | {row.get('query_ms', float('nan')):.2f} |"
        )
    out += [
        "",
        "L = listing level (the query's listing is found), I = image level (another image of it is found). "
        "R@k: share of queries with a hit in the top k. mAP@10: mean average precision over the top 10 "
        "(listing level: the reciprocal rank of the listing). ms/query: one query alone on this machine "
        "(fusions: the sum of their models plus the fusion).",
        "",
        "## Models",
        "",
        "| model | vectors | dim | embedding s/image | hours per 1M images | cost source |",
        "|---|---|---|---|---|---|",
    ]
    for m, info in results["models"].items():
        c = results["costs"].get(m)
        out.append(
            f"| {m}{' (stand-in)' if info.get('standin') else ''} | {info['count']:,} | {info['dim']} | "
            + (
                f"{c['sec_per_image']:.3f} | {c['hours_per_million']:.1f} | {c['source']} |"
                if c
                else "- | - | not measured (--measure-cost) |"
            )
        )
    if results["ablation"]:
        out += [
            "",
            "## Drop one model",
            "",
            "Change in the RRF ensemble's listing-level figures when the model is removed "
            "(negative = the ensemble gets worse without it), 95% CI of the paired difference.",
            "",
            "| model | Δ L R@1 | Δ L R@10 | Δ L mAP@10 | query ms saved | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for a in results["ablation"]:
            cells = []
            for k in ("listing_r1", "listing_r10", "listing_map10"):
                s = a["delta"][k]
                cells.append(f"{_neg(s['mean']):+.3f} [{_neg(s['hi']):+.3f}, {_neg(s['lo']):+.3f}]")
            v = verdict(a["delta"]["listing_map10"], results["costs"].get(a["model"]), results["costs"])
            out.append(f"| {a['model']} | " + " | ".join(cells) + f" | {a['query_ms_saved']:.2f} | {v} |")
    w = results["weights"]
    out += ["", "## Fusion weights", ""]
    if w["fitted_on"]:
        out.append(f"Fitted on {w['fitted_on']} held-out listings, maximising listing mAP@10 (coordinate ascent):")
        out.append("")
        out.append("| method | " + " | ".join(results["models"]) + " | fit-set mAP@10 |")
        out.append("|---|" + "---|" * (len(results["models"]) + 1))
        for method, ws in w["fitted"].items():
            score = w["fit_score"].get(method)
            cells = " | ".join(f"{ws.get(m, 1.0):g}" for m in results["models"])
            out.append(f"| {method} | {cells} | {'-' if score is None else f'{score:.3f}'} |")
    out.append("")
    out.append(
        f"In force for search now: {w['in_force_source']}"
        + (" (" + ", ".join(f"{m}={v:g}" for m, v in w["in_force"].items()) + ")" if w["in_force"] else "")
        + ". `evaluate.py --fit-weights` writes the RRF weights above to `embeddings/fusion_weights.json`."
    )
    out += ["", *_weights_status(w)]
    return "\n".join(out) + "\n"


def write_report(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """report.md + chart.png + results.json in `out_dir` (each written atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = draw_chart(results, out_dir / "chart.png")
    md = out_dir / "report.md"
    atomic_write_text(md, render_markdown(results, chart.name))
    js = out_dir / "results.json"
    atomic_write_text(js, to_json(results))
    return {"markdown": md, "chart": chart, "json": js}


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(results: Mapping[str, Any]) -> str:
    """Strict JSON (NaN -> null)."""
    return json.dumps(_clean(results), indent=2, sort_keys=False, allow_nan=False)
