"""Reproduce the papers' tables: shipped protocols (``protocols/*.json``), one run folder per table cell
(so an interrupted reproduction resumes and finished cells are skipped), and the report (Markdown, JSON,
CSV, Wilcoxon tests, a plot). ``fmabs reproduce`` is the command; :func:`runner.reproduce` the API."""
