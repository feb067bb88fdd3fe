"""The command line of tmc, the layer above the service (app) and training.

``cli.main`` parses and dispatches `tmc <command>`; each concept has its own module
(serve, demo, base, train, client_cmds) and ``cli.errors`` owns the exit codes. Nothing
below this package imports it.
"""
