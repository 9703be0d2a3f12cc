"""Incident reports: for a sandbox, an episode, or every violating episode of a run, a card per rule
that fired and one timeline in time order, rendered for a terminal (rich), as Markdown, JSON and a
self-contained HTML page. model.py builds; render.py and html.py lay out."""

from corral.report.html import to_html
from corral.report.model import (
    SEVERITY_ORDER,
    Card,
    Line,
    Report,
    ReportNotFound,
    Section,
    StepReport,
    build,
)
from corral.report.render import render, to_dict, to_json, to_markdown

__all__ = ["SEVERITY_ORDER", "Card", "Line", "Report", "ReportNotFound", "Section", "StepReport", "build",
           "render", "to_dict", "to_html", "to_json", "to_markdown"]
