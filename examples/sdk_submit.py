"""Submit examples from Python with the contributor SDK, then check the coordinator.

    python examples/sdk_submit.py --coordinator 127.0.0.1:50051 [--key PATH]

The key defaults to the node key `crowdsft node keygen` makes (`node.key` in the crowdsft
home, `$CROWDSFT_HOME` where set; never the current folder, where a private key could end
up committed), and is created there if it does not exist yet. Run it twice:
the second run sends nothing new and gets the same receipts back from the node's state.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crowdsft import Node
from crowdsft.keys import Identity, write_private_key
from crowdsft.node.state import default_key_path

EXAMPLES = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "Name a prime number above 10.", "response": "11 is one.", "system": "Be brief."},
    {
        "messages": [
            {"role": "user", "content": "Translate 'thank you' into German."},
            {"role": "assistant", "content": "Danke."},
        ]
    },
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    ap.add_argument("--key", type=Path, default=None, help="default: the crowdsft home's node.key")
    args = ap.parse_args()
    key = args.key or default_key_path()
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        write_private_key(Identity.generate(), key)
        print(f"created a node key at {key}")

    with Node(args.coordinator, key=key) as node:
        result = node.submit(EXAMPLES)
        for receipt in result:
            print(f"receipt {receipt.contribution_id[:16]}… accepted at {receipt.accepted_at_ms}")
        print(f"{result.report.accepted} accepted, {result.report.already_submitted} already sent")
        status = node.status()
        print(
            f"node {status['node_id']}: {status['contributions']} contributions, "
            f"{status['points']} points"
        )
        check = node.verify()
        print("verified" if check.ok else f"MISMATCH: {check.problems}")


if __name__ == "__main__":
    main()
