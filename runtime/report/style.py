"""The CSS the report pages share (inline in each page: the file stands alone)."""

CSS = """
:root { --ink: #1f2430; --muted: #667085; --line: #e4e7ec; --bg: #f6f7f9; --card: #ffffff;
        --good: #2e7d32; --bad: #c62828; --warn: #b26a00; --accent: #4c72b0; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { margin: 0; font-size: 24px; letter-spacing: -0.01em; }
header .sub { color: var(--muted); margin: 4px 0 0; }
h2 { font-size: 17px; margin: 32px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 0 0 2px; }
code, pre, .mono { font-family: "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; margin-top: 20px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; }
.card .value { font-size: 26px; font-weight: 650; margin-top: 2px; font-variant-numeric: tabular-nums; }
.card .detail { font-size: 12.5px; color: var(--muted); }
.good { color: var(--good); } .bad { color: var(--bad); } .warn { color: var(--warn); }
.panel { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px;
         margin-bottom: 14px; }
.panel img { max-width: 100%; height: auto; display: block; margin: 10px auto 2px; }
.grid2 .panel img { width: 100%; }
td.rules { width: 48%; line-height: 1.7; }
.layer .where { color: var(--muted); font-size: 12.5px; }
.layer .tag { display: inline-block; font-size: 11px; padding: 1px 7px; border-radius: 999px;
              background: #eef2f8; color: var(--accent); margin-left: 6px; vertical-align: 2px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 5px 10px 5px 0; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
td.num { text-align: right; padding-right: 16px; white-space: nowrap; }
th.num { text-align: right; padding-right: 16px; }
tr:last-child td { border-bottom: none; }
.rules { color: var(--muted); font-size: 12px; }
.rules code { color: var(--ink); background: #f2f4f7; padding: 0 4px; border-radius: 4px; }
ul.notes { margin: 0; padding-left: 18px; } ul.notes li { margin: 3px 0; }
details summary { cursor: pointer; color: var(--accent); }
pre { background: #f2f4f7; border-radius: 8px; padding: 10px 12px; overflow-x: auto; margin: 8px 0; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
nav.toc { font-size: 12.5px; color: var(--muted); margin-top: 14px; }
nav.toc a { color: var(--accent); text-decoration: none; margin-right: 10px; white-space: nowrap; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""
