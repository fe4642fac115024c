"""homeforge: from a folder of private documents to an evaluated, compressed, served model, offline."""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("HOMEFORGE_EGRESS_GUARD") == "1":  # a child of a guarded homeforge process: guard it too
    from homeforge.security import egress as _egress

    _egress.install_if_parent_did()
