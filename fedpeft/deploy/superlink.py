"""Flower's SuperLink, started by `fedpeft server` with one addition: its Control and Runtime APIs answer loopback
clients only.

Flower 1.41 serves the Fleet API (what sites use), the Control API (submit runs, register nodes) and the Runtime API
(the ServerApp's channel) on one port, and the open-source Control API has no authentication. Anyone who can reach
the coordinator's port could otherwise submit a run, i.e. code that every site's agent would execute. Sites need
only ``/v1/fleet``; the coordinator's own tools (`flwr`, the ServerApp) connect from this machine.
"""

from __future__ import annotations

import sys
from typing import Any

LOCAL_ONLY_PREFIXES = ("/v1/control", "/v1/runtime")
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
GUARD_ANNOUNCEMENT = "fedpeft: Control and Runtime APIs restricted to loopback clients"


def restrict_to_loopback(app: Any) -> Any:
    """Add the middleware to a FastAPI app (before it starts); returns the app."""
    from starlette.responses import JSONResponse

    @app.middleware("http")
    async def loopback_only(request: Any, call_next: Any) -> Any:
        client = request.client.host if request.client else ""
        if request.url.path.startswith(LOCAL_ONLY_PREFIXES) and client not in LOOPBACK:
            return JSONResponse({"detail": "this API is open to the coordinator's own machine only"}, status_code=403)
        return await call_next(request)

    return app


def main() -> None:
    import flwr.superlink.main as superlink_main
    from flwr.superlink.cli.flower_superlink import flower_superlink

    original = superlink_main.create_app

    def create_guarded_app(*args: Any, **kwargs: Any) -> Any:
        app = restrict_to_loopback(original(*args, **kwargs))
        print(GUARD_ANNOUNCEMENT, flush=True)
        return app

    superlink_main.create_app = create_guarded_app  # flower_superlink imports it at call time
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
