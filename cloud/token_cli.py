"""`coach cloud add-device --tokens FILE DEVICE_ID`: issue a device's bearer token.

Appends `DEVICE_ID sha256(token)` to FILE (created 0600) and prints the token once; the server
keeps only the hash, so a lost token is replaced by removing the device's line and adding it again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coach_runtime.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("device_id", metavar="DEVICE_ID", help="name of the device, e.g. jetson-07")
    p.add_argument("--tokens", type=Path, required=True, metavar="FILE", help="token file of coach cloud serve --tokens")


def run(args) -> int:
    from cloud.auth import add_device

    try:
        token = add_device(args.tokens, args.device_id)
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from None
    print(token)
    return 0
