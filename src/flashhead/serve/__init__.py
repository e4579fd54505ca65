"""Serving: live talking heads over WebRTC and WebSocket, offline jobs over HTTP, a browser page.

The engine (flashhead.pipeline.stream) knows nothing of HTTP; this package is the thin layer around it:
`app` (routes), `worker` (the one engine thread), `sessions` (live sessions and their back-pressure),
`websocket` / `webrtc` (transports), `jobs` (offline generation), `portraits`, `auth`, `limits`, `metrics`;
`replica`, `placement`, `cluster`: the same server in front of engine replicas on a Ray cluster (`serve --ray`).
Install with `pip install flashhead[serve]`; see docs/serving.md.
"""

from flashhead.serve.limits import ServeLimits

__all__ = ["ServeLimits", "create_app"]


def __getattr__(name: str):
    # create_app pulls in FastAPI and aiortc; import them only when a server is actually built.
    if name == "create_app":
        from flashhead.serve.app import create_app

        return create_app
    raise AttributeError(name)
