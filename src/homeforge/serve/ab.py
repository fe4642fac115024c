"""Live A/B in `homeforge serve` (``ab.candidate``): two in-process models, one name, every response tagged.

``ABDriver`` holds the champion's ``LocalDriver`` and a second one for the candidate (its own
``ServerState``: model, engine, registry follower). Each generation request is assigned an
arm before it is prepared: a fresh seeded draw (``ab.by=request``) or a hash of the caller
(``ab.by=key``: the ``user`` field of the request, else the API key id), so one user stays
on one arm. The arm goes into the response (``arm``), the request's audit line and the
feedback log; until the candidate is ready every request goes to the champion. Embeddings,
classifications, /v1/models and reloads are the champion's.
"""

from __future__ import annotations

import contextvars
import hashlib
import random
import threading

from homeforge.serve.local import LocalDriver

CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("homeforge_caller", default=None)
ARMS = ("champion", "candidate")


def arm_for(caller: str | None, percent: float, by: str, seed: int, rng: random.Random) -> str:
    """The arm of one request: the candidate's share is ``percent`` (0-100)."""
    if by == "key" and caller:
        h = hashlib.sha256(f"{seed}\0{caller}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
    else:
        u = rng.random()
    return "candidate" if u < percent / 100 else "champion"


class ABDriver:
    def __init__(self, state):
        from homeforge.config import AbConfig, FeedbackConfig
        from homeforge.serve.state import ServerState

        self.st = state
        self.ab = state.cfg.ab
        cfg = state.cfg.model_copy(update={"model_dir": self.ab.candidate, "model_name": state.name,
                                           "feedback": FeedbackConfig(), "ab": AbConfig()})
        self.cand_state = ServerState(cfg, keys=state.keys, audit=state.audit)
        self.arms = {"champion": LocalDriver(state), "candidate": LocalDriver(self.cand_state)}
        self.rng = random.Random(self.ab.seed)
        self.counts = {a: 0 for a in ARMS}

    @property
    def name(self) -> str:
        return self.st.name

    def describe(self) -> str:
        c = self.cand_state
        return (f"{self.st.name} (A/B: {self.ab.percent:g}% to the candidate {c.version or c.cfg.model_dir}, "
                f"split by {self.ab.by})")

    async def startup(self, load: bool = True) -> None:
        """Load the champion, then the candidate, in one background thread (two threads importing and loading
        transformers models at once can deadlock on import locks; the champion serves as soon as it is ready)."""
        if not load:
            return

        def both() -> None:
            for st in (self.st, self.cand_state):
                if not st.ready:
                    st.load()

        threading.Thread(target=both, name="homeforge-load-ab", daemon=True).start()

    async def shutdown(self) -> None:
        for d in self.arms.values():
            await d.shutdown()

    def check(self, model, kind: str = "causal") -> str:
        return self.arms["champion"].check(model, kind)

    def prepare(self, body):
        arm = arm_for(getattr(body, "user", None) or CALLER.get(), self.ab.percent, self.ab.by, self.ab.seed, self.rng)
        if arm == "candidate" and not self.cand_state.ready:
            arm = "champion"  # the candidate is loading (or failed to): nobody waits for it
        job = self.arms[arm].prepare(body)
        job.arm = arm
        return job

    def start(self, job, ledger):
        arm = getattr(job, "arm", "champion")
        gen = self.arms[arm].start(job, ledger)
        gen.arm = arm
        ledger.notes["arm"] = arm  # into the request's audit line
        self.counts[arm] += 1
        return gen

    async def embed(self, body):
        return await self.arms["champion"].embed(body)

    async def classify(self, body):
        return await self.arms["champion"].classify(body)

    def models(self) -> list[dict]:
        return self.arms["champion"].models()

    async def reload(self) -> None:
        for d in self.arms.values():
            await d.reload()

    async def swap_to_alias(self, force: bool = False) -> bool:
        changed = False
        for d in self.arms.values():
            if d.st.follow is not None:
                changed = await d.swap_to_alias(force) or changed
        return changed
