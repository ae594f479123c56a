"""Inclusion proofs at scale: one request for 4,096 contribution ids of a round that used
100,000 contributions, answered from the coordinator's store (``GetInclusionProofs``'s code
path), beside the proofs alone from one tree, and the root for scale.

    python bench/merkle.py [--leaves 100000] [--ids 4096] [--seed 0] [--json]

Before the tree cached its subtree hashes, every proof rebuilt the sibling subtrees (about
n hashes per proof: 4,096 x 100,000 = 4e8 hashes, most of an hour in Python); now a request
costs one tree build (n - 1 hashes) plus log2(n) look-ups per proof.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaves", type=int, default=100_000)
    parser.add_argument("--ids", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crowdsft.coordinator.store.chain import inclusion_proofs
    from crowdsft.coordinator.store.db import Store
    from crowdsft.ledger import MerkleTree, verify_inclusion

    ids = [hashlib.sha256(f"contribution {i}".encode()).digest() for i in range(args.leaves)]
    wanted = random.Random(args.seed).sample(ids, args.ids)

    t = time.perf_counter()
    root = MerkleTree(ids).root
    root_s = time.perf_counter() - t

    t = time.perf_counter()
    tree = MerkleTree(ids)
    paths = [tree.proof(tree.index[c]) for c in wanted]
    tree_s = time.perf_counter() - t
    assert all(
        verify_inclusion(c, tree.index[c], len(ids), p, root)
        for c, p in zip(wanted, paths, strict=True)
    )

    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "db.sqlite3") as store:
        # A round that used every contribution, written straight into the tables.
        def fill(conn):
            conn.execute(
                "INSERT INTO nodes(node_id, public_key, registered_at_ms) VALUES ('n', x'00', 0)"
            )
            conn.executemany(
                "INSERT INTO contributions(seq, id, node_id, payload, signature, client_ts_ms, "
                "accepted_at_ms, example_count, receipt, receipt_signature) "
                "VALUES (?, ?, 'n', x'', x'', 0, 0, 1, x'', x'')",
                [(i + 1, c) for i, c in enumerate(ids)],
            )
            conn.execute(
                "INSERT INTO rounds(round_id, status, seed, started_ms, strategies, "
                "base_lineage, groups, weights) VALUES (1, 'finished', 0, 0, '{}', '[]', "
                "'[]', '[]')"
            )
            conn.executemany(
                "INSERT INTO round_contributions(round_id, contribution_seq) VALUES (1, ?)",
                [(i + 1,) for i in range(len(ids))],
            )
            conn.execute(
                "INSERT INTO ledger(round_id, record, signature, hash) VALUES (1, x'', x'', x'')"
            )

        store.write(fill, timeout=600)
        t = time.perf_counter()
        proofs = inclusion_proofs(store, wanted)
        request_s = time.perf_counter() - t
    assert len(proofs) == len(wanted)
    assert all(
        verify_inclusion(p["contribution_id"], p["leaf_index"], p["tree_size"], p["path"], root)
        for p in proofs
    )

    result = {
        "leaves": args.leaves,
        "ids": args.ids,
        "root_seconds": round(root_s, 3),
        "proofs_from_one_tree_seconds": round(tree_s, 3),
        "request_seconds": round(request_s, 3),
        "per_proof_ms": round(1000 * request_s / args.ids, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.leaves:,} leaves, {args.ids:,} ids in one request")
        print(f"  root alone:               {root_s:.2f} s")
        print(f"  tree + all proofs:        {tree_s:.2f} s")
        print(f"  GetInclusionProofs path:  {request_s:.2f} s  ({result['per_proof_ms']} ms/proof)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
