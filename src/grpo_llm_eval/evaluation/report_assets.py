"""Static parts of the HTML report: style sheet, the table filter script, the page skeleton.

Everything is inlined into one file that opens offline. The page's Content-Security-Policy allows no network
at all (`default-src 'none'`) and only the one script below (by its sha256), so even a completion that slipped
past escaping could neither run a script nor load anything.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re

CSS = """
:root { --fg: #1d2327; --muted: #5f6b73; --line: #d9dee2; --bg: #ffffff; --soft: #f4f6f8; --accent: #2b6cb0; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header, main { max-width: 1400px; margin: 0 auto; padding: 12px 24px; }
header { border-bottom: 1px solid var(--line); }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 14px; margin: 0 0 6px; }
table + h3 { margin-top: 16px; }
.muted { color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
.card { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; min-width: 140px; }
.card b { display: block; font-size: 18px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 14px; }
.plot { border: 1px solid var(--line); border-radius: 6px; padding: 8px; background: var(--bg); }
.plot svg { width: 100%; height: auto; display: block; }
.plot.absent { background: var(--soft); }
.note { color: var(--muted); font-style: italic; margin: 6px 0; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid var(--line); padding: 4px 6px; vertical-align: top; text-align: left; }
th { background: var(--soft); position: sticky; top: 0; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td .text { white-space: pre-wrap; word-break: break-word; max-height: 12em; overflow: auto; font-family: ui-monospace,
           SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.controls { display: flex; gap: 10px; align-items: center; margin: 8px 0; flex-wrap: wrap; }
.controls input { padding: 5px 8px; min-width: 320px; border: 1px solid var(--line); border-radius: 4px; }
.controls select { padding: 5px; }
.alarms { border: 1px solid #b42318; border-radius: 6px; padding: 4px 12px; margin: 8px 0; background: #fef3f2; }
.status-ok { color: #1f7a3a; }
.status-bad { color: #b42318; font-weight: 600; }
"""

# Plain JavaScript, no library: filter the rollout rows by text and judge_status.
FILTER_JS = """
(function () {
  var input = document.getElementById('rollout-filter');
  var select = document.getElementById('status-filter');
  var shown = document.getElementById('rollout-shown');
  var table = document.getElementById('rollouts');
  if (!input || !select || !table) { return; }
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var texts = rows.map(function (row) { return row.textContent.toLowerCase(); });
  function apply() {
    var query = input.value.trim().toLowerCase();
    var status = select.value;
    var count = 0;
    for (var i = 0; i < rows.length; i++) {
      var ok = (query === '' || texts[i].indexOf(query) !== -1) &&
               (status === '' || rows[i].getAttribute('data-status') === status);
      rows[i].style.display = ok ? '' : 'none';
      if (ok) { count++; }
    }
    shown.textContent = String(count);
  }
  input.addEventListener('input', apply);
  select.addEventListener('change', apply);
  apply();
})();
"""


def script_hash(script: str) -> str:
    """CSP source expression allowing exactly SCRIPT as an inline script."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii") + "'"


def page(title: str, body: str) -> str:
    """The whole document; TITLE and BODY must already be escaped HTML."""
    csp = (f"default-src 'none'; style-src 'unsafe-inline'; script-src {script_hash(FILTER_JS)}; img-src data:; "
           "base-uri 'none'; form-action 'none'")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<link rel=\"icon\" href=\"data:,\">\n"  # no favicon request
        f"<title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
        f"<script>{FILTER_JS}</script>\n</body>\n</html>\n"
    )


def svg_figure(draw, size: tuple[float, float] = (5.6, 2.9)) -> str:
    """An inline <svg> element of a matplotlib figure whose one axes DRAW(ax) fills (Agg-free SVG canvas)."""
    import matplotlib
    from matplotlib.figure import Figure

    # svg.fonttype none: text stays text (small, searchable); a fixed hash salt makes ids and files reproducible.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "grpo-llm-eval-report"}):
        fig = Figure(figsize=size, layout="constrained")
        ax = fig.add_subplot()
        draw(ax)
        ax.grid(True, alpha=0.3)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: not valid inside HTML
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
