"""`coach cloud ...`: the cloud service."""

from coach_runtime.cli import Command

COMMANDS = [
    Command("serve", "cloud.serve_cli", "serve plan bundles' tails over gRPC", "cloud"),
    Command("certs", "cloud.certs", "make a dev CA and server/client certificates", "cloud"),
    Command("add-device", "cloud.token_cli", "issue a device bearer token (printed once, stored hashed)", "cloud"),
]
