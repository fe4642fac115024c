"""`homeforge ui`: a local web dashboard over the artifacts, runs, registry and audit log.

Server-rendered (FastAPI + Jinja2 templates) with one small hand-written script for the
charts, live polling and streaming chat; every asset is served from this package. The pages
read what the stages write (manifests, report.json, metrics.jsonl, the registry index, the
audit log) and act through the same library functions as the CLI. See docs/ui.md.
"""
