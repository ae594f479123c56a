"""Admission by invitation: single-use, expiring tokens from ``crowdsft coordinator invite``."""

from __future__ import annotations

import json

import grpc
import pytest
from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.coordinator.store.db import Store
from crowdsft.coordinator.store.invites import issue_invites
from crowdsft.envelope import new_nonce, now_ms, sign_envelope
from crowdsft.errors import CoordinatorError
from crowdsft.keys import Identity
from crowdsft.plugins.hookspecs import hookimpl
from crowdsft.plugins.manager import get_plugins
from crowdsft.v1 import contribution_pb2


def contribution(identity: Identity, text: str, coordinator: bytes):
    return sign_envelope(
        identity,
        contribution_pb2.ContributionPayload(
            examples=[contribution_pb2.Example(prompt=text, response=text + " answer")],
            nonce=new_nonce(),
            timestamp_ms=now_ms(),
        ),
        coordinator,
    )


def invite(coord, *args: str) -> list[str]:
    result = CliRunner().invoke(
        main,
        ["coordinator", "invite", "--config", str(coord.config.path), "--json", *args],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return [t["token"] for t in json.loads(result.stdout)]


def test_the_policies_are_plugins():
    assert {"open", "allowlist", "invite"} <= set(get_plugins().names("admission"))


def test_invited_nodes_only(make_coordinator):
    coord = make_coordinator(admission={"policy": "invite"})
    alice, bob, carol = (Identity.generate() for _ in range(3))
    with coord.client() as c:
        with pytest.raises(grpc.RpcError) as err:
            c.stub.SubmitContribution(
                contribution(alice, "hello", coordinator=coord.public_key), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--invite" in err.value.details()
        with pytest.raises(CoordinatorError, match="admits by invitation"):
            c.register(alice)
        with pytest.raises(CoordinatorError, match="not valid"):
            c.register(alice, invite_token="csft-made-up")
        assert coord.counts() == {"nodes": 0, "contributions": 0, "nonces": 0}

        first, second = invite(coord, "--count", "2", "--note", "workshop")
        assert first != second and first.startswith("csft-")
        assert c.register(alice, "alice", first).newly_registered
        c.stub.SubmitContribution(
            contribution(alice, "hello", coordinator=coord.public_key), timeout=5
        )
        with pytest.raises(CoordinatorError, match="already been used"):
            c.register(bob, invite_token=first)
        assert not c.register(alice).newly_registered  # admitted once, admitted for good
        assert c.register(bob, invite_token=second).newly_registered

        with Store(coord.config.db_path) as store:
            [(expired, _)] = store.write(
                lambda conn: issue_invites(conn, 1, ttl_s=60, now_ms=now_ms() - 120_000)
            )
        with pytest.raises(CoordinatorError, match="expired"):
            c.register(carol, invite_token=expired)
    assert coord.counts()["nodes"] == 2
    stored = coord.coordinator.store.query("SELECT token_hash, note FROM invites")
    assert len(stored) == 3 and all(first.encode() not in bytes(h) for h, _ in stored)


def test_node_register_with_an_invite_from_the_cli(make_coordinator, tmp_path):
    coord = make_coordinator(admission={"policy": "invite"})
    [token] = invite(coord, "--expires", "2h")
    key = tmp_path / "n.key"
    runner = CliRunner()
    assert runner.invoke(main, ["node", "keygen", "--out", str(key)]).exit_code == 0
    args = ["node", "register", "--coordinator", coord.address, "--key", str(key)]
    refused = runner.invoke(main, args)
    assert refused.exit_code != 0 and "invitation" in refused.output
    ok = runner.invoke(main, [*args, "--invite", token])
    assert ok.exit_code == 0 and "registered" in ok.output
    # Before: registering again with --name said only "already registered", though the
    # coordinator had set the name. Now it says so.
    again = runner.invoke(main, [*args, "--name", "alice"])
    assert again.exit_code == 0, again.output
    assert "already registered; its display name is now 'alice'" in again.output
    assert coord.coordinator.store.query("SELECT display_name FROM nodes")[0][0] == "alice"


def test_bad_expiry_is_a_usage_error(coord):
    result = CliRunner().invoke(
        main, ["coordinator", "invite", "--config", str(coord.config.path), "--expires", "soon"]
    )
    assert result.exit_code == 2 and "not a duration" in result.output


class WorkingHours:
    """A plugin's policy: admits nobody whose node id starts with "0" (a stand-in rule)."""

    @hookimpl
    def crowdsft_register_admission(self, register):
        from crowdsft.errors import NotAdmittedError
        from crowdsft.plugins.admission import AdmissionPolicy

        class NoZeros(AdmissionPolicy):
            def check(self, node_id):
                if node_id.startswith("0"):
                    raise NotAdmittedError("node ids starting with 0 are not admitted here")

        register("no-zeros", NoZeros)


def test_a_plugin_policy_by_name(make_coordinator):
    plugins = get_plugins()
    name = plugins.register(WorkingHours())
    try:
        coord = make_coordinator(admission={"policy": "no-zeros"})
        zero = next(i for i in iter(Identity.generate, None) if i.node_id.startswith("0"))
        other = next(i for i in iter(Identity.generate, None) if not i.node_id.startswith("0"))
        with coord.client() as c:
            c.stub.SubmitContribution(
                contribution(other, "fine", coordinator=coord.public_key), timeout=5
            )
            with pytest.raises(grpc.RpcError) as err:
                c.stub.SubmitContribution(
                    contribution(zero, "refused", coordinator=coord.public_key), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert coord.counts()["contributions"] == 1
    finally:
        plugins.unregister(name)
