"""The silos: fedbridge's handlers for the two methods the ServerApp runs, on this app's own ClientApp (where handlers
or mods of your own would go too)."""

from flwr.clientapp import ClientApp

from fedbridge.client_app import register

app = register(ClientApp(), methods=["local", "pe"])
