"""The OpenAI-compatible server with per-request steering, capping, telemetry, a closed loop and a dashboard."""

from personaxis.serve.app import Limits, create_app
from personaxis.serve.loop import ClosedLoop
from personaxis.serve.run import run_server

__all__ = ["ClosedLoop", "Limits", "create_app", "run_server"]
