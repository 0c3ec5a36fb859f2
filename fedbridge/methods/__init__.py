"""fedbridge's methods, one folder each: ``config.py`` (its options, read by both sides), ``server.py`` (its
``Method``: what the ServerApp does), ``silo.py`` (what a silo does for it, called by the ClientApp). The silo side
never imports a ``server.py``; the registry of runnable methods is ``fedbridge.methods.registry`` (server side)."""
