"""Storage servers started on loopback for the tests, the benchmarks and the soak script.

The one implementation of "start a redis-server / a SeaweedFS ``weed mini`` of our own on
free 127.0.0.1 ports, wait until it really serves, and stop it afterwards":

- ``loopback.ports``: free loopback ports.
- ``loopback.process``: finding a binary, stopping a process, the errors raised here.
- ``loopback.redis_server``: ``redis_server(workdir, appendonly=...)`` answers a URL once
  redis-server answers PING.
- ``loopback.weed``: ``weed_server(workdir, like=...)`` answers an ``S3Endpoint`` once its S3
  gateway accepts a signed write; ``like`` restarts a stopped one on the same ports, keys and
  data.

Policy: every server is bound to 127.0.0.1 with its files and log in a folder the caller owns,
and stopped (SIGTERM, then SIGKILL) when its block ends; nothing here touches a server it did
not start. A missing binary raises ``MissingBinary`` whose message is the command that
installs it, a server that does not come up raises ``ServerDidNotStart`` with its log's tail;
the caller decides what that means (the tests fail, never skip). Layer: this package imports
none of ours (stdlib, the redis and boto3 clients); tests, bench and scripts import it. It is
not part of the installed product: like bench/, it is used from the repository root.
"""
