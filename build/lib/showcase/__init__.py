"""The main job: the whole collection on the demo world, from data to an HTML report.

``python -m showcase --out demo`` (what ``make demo`` runs) generates the demo world, prepares it
with every ``data_prep`` step, trains each bundle briefly with ``python -m monai.bundle run``,
evaluates it, runs inference on held-out cases and writes ``<out>/report/index.html``.
"""
