"""Self-contained HTML report of a screening run (no external files: figures are embedded PNGs), and the
same report as one picture (``report.png``) for slides and lab notebooks."""
from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence

import numpy as np

#: Thumbnails share one colour scale: 0 nm to this percentile of the shown maps' pixels.
THUMB_PERCENTILE = 99.9
#: Candidates drawn in the report's picture (``report.png``); the HTML page shows every gallery map.
FIGURE_CANDIDATES = 12


def _png(figure_or_array, **imsave_kwargs) -> str:
    """base64 PNG of a matplotlib figure, or of a 2-D array (``imsave_kwargs`` as matplotlib.image.imsave)."""
    from matplotlib.image import imsave

    buf = io.BytesIO()
    if hasattr(figure_or_array, "savefig"):
        figure_or_array.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    else:
        imsave(buf, figure_or_array, format="png", **imsave_kwargs)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _threshold_used(summary: dict) -> str:
    """The run's threshold and why (the validation or control one, or raised on the sample's own scores)."""
    check = summary["threshold_check"]
    source = summary.get("operating_point", {}).get("source", "validation")
    if check["source"] != "sample":
        return (f"{summary['threshold']:.4g}, the {check['source']}: {check['above_validation_threshold']} "
                f"of {check['n']} in-distribution maps at or above it; {check['allowed']} allowed")
    return (f"{summary['threshold']:.4g}, raised on this sample: {check['above_validation_threshold']} of "
            f"{check['n']} in-distribution maps scored at or above the {source} threshold, more than the "
            f"{check['allowed']} its false-positive rate allows (this session's cells score higher)")


def _control_facts(summary: dict) -> list[tuple[str, str]]:
    """Report lines on the negative control that set the threshold (none for a validation threshold)."""
    control = summary.get("control")
    if not control:
        return []
    low, high = control["rate_ci"]
    return [("negative control", f"{control['n_maps']} maps, {control['n_in_distribution']} in distribution "
             f"({control['n_out_of_distribution']} out of distribution left out), "
             f"{len(control['files'])} files"),
            ("control maps at or above the threshold", f"{control['n_above']} ({control['rate']:.3g}, 95% CI "
             f"{low:.3g}-{high:.3g})")]


def _confidence_facts(summary: dict) -> list[tuple[str, str]]:
    """Report line on the confidence that the threshold's false-positive rate is at most its fpr."""
    rate = summary.get("operating_point", {}).get("rate_at_threshold")
    if not rate:
        return []
    fpr, k = summary["operating_point"]["fpr"], rate["order_statistic"]
    how = f"order statistic {k} of {rate['n']}" if k else "extrapolated threshold"
    return [("false-positive rate at the threshold", f"at most {rate['upper']:.3g} with probability "
             f"{rate['confidence']:g}; exceeds {fpr:g} with probability at most "
             f"{rate['exceed_probability']:.2g} ({how})")]


def _expected_fp(summary: dict, with_basis: bool = True) -> str:
    """Expected false positives with their interval and (``with_basis``) what they rest on (an estimate or an
    upper bound)."""
    ci, basis = summary.get("expected_false_positives_ci"), summary.get("expected_false_positives_basis")
    text = _fmt(summary["expected_false_positives"])
    if basis and basis.startswith("upper bound"):
        text = f"at most {text}"
    if ci:
        text += f" (interval {ci[0]:.3g}-{ci[1]:.3g})"
    return f"{text}; {basis}" if basis and with_basis else text


def _histogram(ax, scores, threshold: float) -> None:
    """Draw the target scores' histogram (log counts) with the threshold on ``ax``."""
    ax.hist(np.asarray(scores, float), bins=np.linspace(0, 1, 51), color="0.45", log=True)
    ax.axvline(threshold, color="crimson", lw=2, label=f"threshold {threshold:.4g}")
    ax.set_xlabel("calibrated probability of a target class")
    ax.set_ylabel("maps (log scale)")
    ax.legend(loc="upper center")


def score_histogram(scores: np.ndarray, threshold: float) -> str:
    """base64 PNG: histogram of the target scores (log counts) with the threshold marked.

    Parameters
    ----------
    scores : (N,) ndarray
        Calibrated target probabilities (0-1).
    threshold : float
        The operating point's threshold.

    Returns
    -------
    str
        The PNG, base64-encoded (for an ``<img src="data:...">``).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), layout="constrained")
    _histogram(fig.subplots(), scores, threshold)
    return _png(fig)


def _thumbnail_scale(maps: np.ndarray) -> float:
    """Upper end (nm) of the thumbnails' shared colour scale: the THUMB_PERCENTILE of the shown maps."""
    return max(float(np.percentile(maps, THUMB_PERCENTILE)) if len(maps) else 1.0, 1.0)


def _percent(value) -> str:
    return f"{value:.2%}" if isinstance(value, float) else str(value)


def _figure_facts(summary: dict) -> list[str]:
    """The report's headline lines, as the picture shows them."""
    point = summary["operating_point"]
    confidence = summary.get("fpr_confidence")
    rate = f"false-positive rate {point['fpr']:g}" + (f", confidence {confidence:g}" if confidence else "")
    speed = summary.get("maps_per_second")
    return [f"{summary['maps_read']:,} maps screened ({summary['maps_skipped']} skipped), "
            f"{summary['out_of_distribution']} out of distribution",
            f"flagged: {summary['flagged']} (targets {', '.join(summary['targets'])})",
            f"threshold {summary['threshold']:.4g} from the {summary.get('threshold_source', 'validation')}; "
            f"{rate}",
            f"expected false positives: {_expected_fp(summary, with_basis=False)}",
            f"expected purity at prevalence {summary['prevalence']:g}: "
            f"{_percent(summary['expected_purity'])}",
            f"model {summary['model']}" + (f"; {speed:.0f} maps/s" if speed else "")]


def report_figure(summary: dict, gallery: Sequence[dict], maps: np.ndarray, rows: Sequence[dict],
                  n_shown: int = FIGURE_CANDIDATES):
    """The report as one picture (``report.png``): headline figures, score histogram, the first candidates.

    Parameters
    ----------
    summary : dict
        The run's summary.json content.
    gallery : sequence of dict
        Candidate rows (most probable first), matching ``maps``.
    maps : (n, S, S) array
        The candidates' OPD maps in nm.
    rows : sequence of dict
        Every scored row (for the histogram).
    n_shown : int
        Candidates drawn (the first ones; the HTML report shows them all).

    Returns
    -------
    matplotlib.figure.Figure
        Axes: the headline text, the histogram, then one per candidate shown, titled ``#k p=... / ... pg``.
    """
    from matplotlib.figure import Figure

    shown = min(n_shown, len(gallery))
    n_cols = max(1, -(-n_shown // 2))   # two rows
    fig = Figure(figsize=(13, 8.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.15])
    text_ax, hist_ax = top.subplots(1, 2, width_ratios=[1, 1.1])
    text_ax.axis("off")
    text_ax.set_title("Screening report", loc="left", fontsize=14, fontweight="bold")
    text_ax.text(0, 0.95, "\n".join(_figure_facts(summary)), va="top", fontsize=10, wrap=True,
                 transform=text_ax.transAxes)
    _histogram(hist_ax, [float(r["p_target"]) for r in rows], summary["threshold"])
    bottom.suptitle(f"Candidates {shown} of {summary['flagged']} (OPD, nm; all in report.html)", x=0.02,
                    ha="left", fontsize=11)
    axes = bottom.subplots(2, n_cols).ravel()
    vmax = _thumbnail_scale(np.asarray(maps[:shown], np.float32))
    image = None
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < shown:
            r = gallery[i]
            image = ax.imshow(np.asarray(maps[i], np.float32), vmin=0, vmax=vmax, cmap="viridis")
            ax.set_title(f"#{i + 1} p={float(r['p_target']):.3f}\n{float(r['dry_mass_pg']):.0f} pg",
                         fontsize=9)
    if image is not None:
        bottom.colorbar(image, ax=list(axes), label="OPD (nm)", shrink=0.8)
    return fig


def _e(text) -> str:
    return html.escape(str(text))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def screening_report(summary: dict, gallery: Sequence[dict], maps: np.ndarray, rows: Sequence[dict]) -> str:
    """The report page.

    Parameters
    ----------
    summary : dict
        The run's summary.json content.
    gallery : sequence of dict
        Candidate rows shown (most probable first), matching ``maps``.
    maps : (n, S, S) array
        The candidates' OPD maps in nm.
    rows : sequence of dict
        Every scored row (for the histogram).

    Returns
    -------
    str
        HTML with every figure embedded.
    """
    point = summary["operating_point"]
    source = point.get("source", "validation")
    vmax = _thumbnail_scale(maps)
    facts = [("model", summary["model"]), ("maps screened", summary["maps_read"]),
             ("files read / skipped", f"{summary['files_read']} / {summary['files_skipped']}"),
             ("maps skipped", summary["maps_skipped"]), ("flagged", summary["flagged"]),
             ("out of distribution (never flagged)", summary["out_of_distribution"]),
             ("target classes", ", ".join(summary["targets"])),
             ("false-positive rate", point["fpr"]),
             ("threshold source", summary.get("threshold_source", source)),
             (f"threshold on {source}", f"{point['threshold']:.4g} "
              f"(95% CI {point['threshold_ci'][0]:.4g}-{point['threshold_ci'][1]:.4g})"),
             *_control_facts(summary), *_confidence_facts(summary),
             ("threshold used", _threshold_used(summary)),
             ("sensitivity on validation", f"{point['sensitivity']:.3f} (95% CI "
              f"{point['sensitivity_ci'][0]:.3f}-{point['sensitivity_ci'][1]:.3f})"),
             ("how the threshold was set", point["basis"]),
             ("prevalence assumed", summary["prevalence"]),
             ("expected false positives", _expected_fp(summary)),
             ("expected purity of the flagged maps", summary["expected_purity"]),
             ("maps per second", summary["maps_per_second"])]
    table = "\n".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in facts)
    cards = "\n".join(
        f'<figure class="cand"><img alt="candidate {i + 1}" src="data:image/png;base64,'
        f'{_png(np.clip(m.astype(np.float32), 0, vmax), vmin=0, vmax=vmax, cmap="viridis")}">'
        f"<figcaption>#{i + 1} p={float(r['p_target']):.3f}<br>{float(r['dry_mass_pg']):.0f} pg, "
        f"{_e(r['predicted'])}<br><small>{_e(r['file'])} [{_e(r['index'])}:{_e(r['cell'])}]</small>"
        f"</figcaption></figure>"
        for i, (r, m) in enumerate(zip(gallery, maps, strict=True)))
    more = summary["flagged"] - len(gallery)
    histogram = score_histogram([float(r["p_target"]) for r in rows], summary["threshold"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>opdcells screening report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} th{{text-align:left;padding-right:1em}}
.cand{{display:inline-block;margin:4px;width:150px;font-size:12px;vertical-align:top}}
.cand img{{width:150px;height:150px;image-rendering:pixelated}}</style></head><body>
<h1>Screening report</h1>
<table id="summary">{table}</table>
<h2>Scores</h2><img alt="score histogram" src="data:image/png;base64,{histogram}">
<h2 id="candidates">Candidates ({summary['flagged']})</h2>
<p>OPD thumbnails, colour scale 0-{vmax:.0f} nm (viridis; the {THUMB_PERCENTILE}th percentile of the shown
maps, brighter pixels clipped){f"; {more} more in candidates.csv" if more > 0 else ""}.</p>
<div id="gallery">{cards}</div>
<h2>Settings</h2><pre id="settings">{_e(json.dumps(summary['settings'], indent=2))}</pre>
</body></html>
"""
