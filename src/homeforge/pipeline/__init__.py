"""`homeforge run`: a pipeline file's stages (prepare, train, eval, compress, export, register, serve)
run in order, each skipped when its artifact is up to date (``spec``: the file; ``stages``: one
stage's status and run; ``runner``: the order, --dry-run, --from/--until, --init)."""
