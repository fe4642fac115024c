"""`homeforge serve registry:NAME@ALIAS`: which version an alias names now, and whether that changed.

The server polls the name's ``index.json`` (its modification time and size, every
``registry_poll`` seconds: a file watch that needs no inotify); on a change it resolves the
alias again and, when it names another version, swaps it in (``serve.local``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from homeforge.errors import HomeforgeError

PREFIX = "registry:"


@dataclass
class Target:
    label: str  # NAME@vN-HASH12: what responses and /v1/models report
    path: Path
    version: int


class AliasFollower:
    def __init__(self, ref: str, root: Path | None = None):
        from homeforge.registry.store import Registry

        self.ref = ref
        self.name, _, self.alias = ref.partition("@")
        self.registry = Registry(root)
        self._stamp: tuple | None = None

    def current(self) -> Target:
        r = self.registry.resolve(self.ref)
        return Target(f"{r.name}@v{r.version['version']}-{r.version['content_hash'][:12]}", r.path,
                      r.version["version"])

    def changed(self) -> bool:
        """The index changed since the last call (the first call only records it)."""
        try:
            st = (self.registry.root / self.name / "index.json").stat()
        except OSError:
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        before, self._stamp = self._stamp, stamp
        return before is not None and stamp != before


def resolve(cfg):
    """``model_dir: registry:NAME[@ALIAS]`` -> (the config with the version's folder, the follower, its label);
    any other config -> (cfg, None, None)."""
    ref = str(cfg.model_dir or "")
    if not ref.startswith(PREFIX):
        return cfg, None, None
    ref = ref[len(PREFIX):]
    if not ref or ref.startswith("@"):
        raise HomeforgeError(f"{cfg.model_dir}: expected registry:NAME@ALIAS", fix="e.g. registry:docs@champion")
    follow = AliasFollower(ref)
    target = follow.current()  # a name or alias that does not exist fails now, before binding
    follow.changed()
    return (cfg.model_copy(update={"model_dir": str(target.path), "model_name": cfg.model_name or follow.name}),
            follow, target.label)
