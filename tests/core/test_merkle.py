"""The ledger's Merkle tree (RFC 6962 hashing) against vectors computed here by hand from
hashlib, and the cost of many proofs from one tree."""

from __future__ import annotations

import hashlib

import pytest

from crowdsft import ledger
from crowdsft.ledger import MerkleTree, merkle_root, verify_inclusion

IDS = [bytes([i]) * 32 for i in range(8)]


def L(i: int) -> bytes:
    return hashlib.sha256(b"\x00" + IDS[i]).digest()


def N(a: bytes, b: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + a + b).digest()


ROOTS = {
    1: lambda: L(0),
    2: lambda: N(L(0), L(1)),
    3: lambda: N(N(L(0), L(1)), L(2)),
    5: lambda: N(N(N(L(0), L(1)), N(L(2), L(3))), L(4)),
    7: lambda: N(N(N(L(0), L(1)), N(L(2), L(3))), N(N(L(4), L(5)), L(6))),
}
PROOFS = {  # (tree size, leaf): audit path from the leaf up
    (1, 0): lambda: [],
    (3, 2): lambda: [N(L(0), L(1))],
    (3, 0): lambda: [L(1), L(2)],
    (5, 4): lambda: [N(N(L(0), L(1)), N(L(2), L(3)))],
    (5, 2): lambda: [L(3), N(L(0), L(1)), L(4)],
    (7, 6): lambda: [N(L(4), L(5)), N(N(L(0), L(1)), N(L(2), L(3)))],
    (7, 5): lambda: [L(4), L(6), N(N(L(0), L(1)), N(L(2), L(3)))],
}


@pytest.mark.parametrize("size", sorted(ROOTS))
def test_roots_match_hand_computed_vectors(size):
    assert merkle_root(IDS[:size]) == ROOTS[size]()
    assert MerkleTree(IDS[:size]).root == ROOTS[size]()


def test_the_empty_tree_is_the_hash_of_nothing():
    assert merkle_root([]) == hashlib.sha256(b"").digest()


@pytest.mark.parametrize(("size", "leaf"), sorted(PROOFS))
def test_proofs_match_hand_computed_vectors_and_verify(size, leaf):
    tree = MerkleTree(IDS[:size])
    path = tree.proof(leaf)
    assert path == PROOFS[(size, leaf)]()
    assert verify_inclusion(IDS[leaf], leaf, size, path, ROOTS[size]())
    assert not verify_inclusion(IDS[leaf], (leaf + 1) % size, size, path, ROOTS[size]()) or (
        size == 1
    )
    assert not verify_inclusion(b"\xff" * 32, leaf, size, path, ROOTS[size]())


def test_every_proof_of_every_size_verifies():
    for size in range(1, 40):
        ids = [hashlib.sha256(str(i).encode()).digest() for i in range(size)]
        tree = MerkleTree(ids)
        for i in range(size):
            assert verify_inclusion(ids[i], i, size, tree.proof(i), tree.root)


def test_many_proofs_hash_each_inner_node_once(monkeypatch):
    """A tree of n leaves has n - 1 inner nodes; all n proofs together must not hash more
    (the earlier code recomputed sibling subtrees for every proof: quadratic)."""
    calls = []
    real = ledger._node
    monkeypatch.setattr(ledger, "_node", lambda a, b: calls.append(1) or real(a, b))
    n = 1000
    tree = MerkleTree([hashlib.sha256(str(i).encode()).digest() for i in range(n)])
    for i in range(n):
        tree.proof(i)
    assert tree.root  # the root is the one inner node no proof needs
    assert len(calls) == n - 1
