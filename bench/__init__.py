"""Benchmarks of s6tls against C tools (socat, stunnel, openssl s_server): ``./bench/run``.

Modules: ``common`` (processes, rusage, statistics), ``endpoint`` (the data
source and sink, run as its own process), ``tunnels`` (how each tool is
started), ``throughput``, ``handshakes``, ``startup``, ``memory``, and
``report`` (text, targets, plot).  See README.md, section Performance.
"""
