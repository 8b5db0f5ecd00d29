"""Kernel TLS (``--ktls``): Linux runs the records once OpenSSL's handshake is done.

``keys`` derives the record keys from the handshake, ``sockopts`` gives
them to the socket and reads and writes its non-data records, ``path`` is
the spliced data path the engine drives.
"""
