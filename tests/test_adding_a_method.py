"""Adding a method is one folder and one registry line (docs/architecture.md#adding-a-method): a toy method package
written here, outside fedbridge, and registered by its one line in ``fedbridge.methods.PACKAGES``, is found by every
side: the server's registry (``get_method``, ``option_class``), the strategies, the silo's handlers (``register``, and
a request answered through them), the protocol catalogue, and the generated config (docs/config.md and pyproject)."""

from __future__ import annotations

import sys
import textwrap

import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from fedbridge import client_app, config_reference, methods
from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig
from fedbridge.methods import registry
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.strategies.base import silo_sections

TOY = {
    "__init__.py": '"""A toy method: one message type, one handler, one option."""\n',
    "config.py": '''
        """`toy.*`: the toy method's options."""

        from dataclasses import dataclass, field


        @dataclass(frozen=True)
        class ToyConfig:
            loudness: int = field(default=3, metadata={"help": "how loud the toy's ping is"})
    ''',
    "server.py": '''
        from fedbridge.methods.base import Method


        class Toy(Method):
            name = "toy"
            description = "a toy method: one ping per silo"

            def run(self, session):
                raise NotImplementedError
    ''',
    "messages.py": '''
        TOY_PING = "query.toy_ping"
        SILO_SECTIONS = ("toy",)  # its silo reads toy.* from the run config

        CATALOGUE = {TOY_PING: "config -> metrics: pong (the toy's only message)"}
    ''',
    "handlers.py": '''
        from flwr.app import Message

        from fedbridge import handlers as core
        from fedbridge import protocol as p
        from toy_method.messages import TOY_PING


        def ping(msg, context):
            p.check_version(msg.content)
            return Message(p.metrics_reply({"pong": 1}), reply_to=msg)


        HANDLERS = {TOY_PING: ping, p.DP_VOTE: core.dp_vote}  # its own message, and a core one by reference
    ''',
}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy package on the path, and its one registry line."""
    for name, source in TOY.items():
        (tmp_path / "toy_method").mkdir(exist_ok=True)
        (tmp_path / "toy_method" / name).write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(methods.PACKAGES, "toy", "toy_method")  # the one line
    monkeypatch.setattr(registry, "METHODS", registry.discover())  # what importing the registry does
    yield "toy"
    for name in [m for m in sys.modules if m.partition(".")[0] == "toy_method"]:  # each test writes its own
        del sys.modules[name]


def test_one_folder_and_one_registry_line_reach_every_side(toy):
    import toy_method.config
    import toy_method.server

    # the server side
    assert registry.get_method("toy") is toy_method.server.Toy
    assert registry.option_class("toy") is toy_method.config.ToyConfig
    assert ExperimentConfig.from_run_config({"method": "toy", "toy.loudness": 5}).method == "toy"
    assert silo_sections()[-1] == "toy"  # a strategy refuses a Python change of toy.*: the silos read it
    # the silo side: register finds its handlers, with the core's it lists, and answers its message
    app = client_app.register(ClientApp(), ["toy"])
    assert set(app._registered_funcs) == {"query.info", "query.toy_ping", "query.dp_vote"}
    assert "toy" in client_app.served(client_app.handler_table())
    assert "toy" not in client_app.SERVED  # fedbridge's own ClientApp was built before the line was added
    grid = InProcessGrid(app, {}, [{"partition-id": 0}])
    [node] = grid.get_node_ids()
    [reply] = grid.send_and_receive([Message(p.request(), dst_node_id=node, message_type="query.toy_ping",
                                             group_id="1")], timeout=60)
    assert reply.content[p.METRICS]["pong"] == 1
    # the protocol: the catalogue and the constant
    assert p.catalogue()["query.toy_ping"] == ("toy", "config -> metrics: pong (the toy's only message)")
    assert "| `query.toy_ping` | toy |" in p.catalogue_markdown()
    # the generated config: docs/config.md's table and pyproject's block
    assert "| `toy.loudness` | int | `3` | how loud the toy's ping is |" in config_reference.reference_markdown()
    assert "\ntoy.loudness = 3\n" in config_reference.pyproject_block()


def test_a_message_type_declared_twice_or_answered_twice_fails(toy, tmp_path):
    (tmp_path / "toy_method" / "messages.py").write_text('CATALOGUE = {"query.score": "x -> y"}\n')
    with pytest.raises(ValueError, match="message type 'query.score' of method 'toy' is crosslm's already"):
        p.catalogue()
    (tmp_path / "toy_method" / "handlers.py").write_text(
        "from fedbridge import handlers as core\nHANDLERS = {'query.dp_vote': core.info}\n")
    with pytest.raises(TypeError, match="method 'toy' answers 'query.dp_vote' with info"):
        client_app.handler_table()


def test_a_registered_package_without_its_method_fails_naming_it(monkeypatch):
    monkeypatch.setitem(methods.PACKAGES, "ghost", "fedbridge.methods.local")
    with pytest.raises(TypeError, match="method 'ghost': fedbridge.methods.local.server must define one Method"):
        registry.discover()


def test_every_message_type_has_its_catalogue_entry_and_its_handler():
    """fedbridge's own methods: what the catalogue lists is what the silo side answers, each declared once."""
    assert set(client_app.HANDLERS) == set(p.catalogue())
    assert client_app.SERVED == tuple(registry.METHODS)  # every method has a silo side, in the registry's order
