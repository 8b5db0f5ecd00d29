"""Benchmarks of s6tls against C tools (socat, stunnel, openssl s_server, s6-networking).

``./bench/run``.  Modules: ``common`` (processes, rusage, statistics),
``endpoint`` (the data source and sink, run as its own process),
``tunnels`` (how each tool is started as a tunnel), ``servers`` (how each
TLS server is started per connection), ``reaper`` (a subreaper each such
server runs under), ``netns`` (network namespaces, with and without
quickack), ``throughput``, ``handshakes``, ``startup``, ``memory``,
``scale`` (10,000 connections held, a worker after 100,000), and
``report`` (text, targets, plot).  See README.md, section Performance.
"""
