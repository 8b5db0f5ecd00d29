"""Two real OpenSSL endpoints in one process, joined by memory BIOs.

``handshake(server, client)`` runs a complete TLS handshake between two
``SSL.Connection`` objects made with ``SSL.Connection(ctx, None)``, moving
the bytes each one writes to the other, and returns the exception each side
raised (None for success).  For tests of contexts and of the binding, where
processes and sockets would only add time; every program is also tested
against real peers over real sockets.
"""

from OpenSSL import SSL


def connections(server_ctx: SSL.Context, client_ctx: SSL.Context) -> tuple[SSL.Connection, ...]:
    """A server connection in accept state and a client in connect state, on memory BIOs."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    return server, client


def handshake(
    server: SSL.Connection, client: SSL.Connection, rounds: int = 20
) -> tuple[Exception | None, Exception | None]:
    """Drive both handshakes to their end; return (server error, client error).

    A side that fails stops; what it wrote (an alert) still reaches the other.
    """
    errors: dict[SSL.Connection, Exception | None] = {server: None, client: None}
    done = {server: False, client: False}
    for _ in range(rounds):
        for me, peer in ((client, server), (server, client)):
            if not done[me] and errors[me] is None:
                try:
                    me.do_handshake()
                    done[me] = True
                except SSL.WantReadError:
                    pass
                except Exception as exc:
                    errors[me] = exc
            _move(me, peer)
        if all(done[c] or errors[c] for c in (server, client)):
            break
    _move(server, client)
    _move(client, server)
    return errors[server], errors[client]


def exchange(sender: SSL.Connection, receiver: SSL.Connection, data: bytes) -> bytes:
    """Send ``data`` one way after the handshake; return what arrived.

    Reading also processes what came with it (a TLS 1.3 client's session tickets).
    """
    sender.sendall(data)
    _move(sender, receiver)
    return receiver.recv(65536)


def _move(src: SSL.Connection, dst: SSL.Connection) -> None:
    while True:
        try:
            data = src.bio_read(65536)
        except SSL.WantReadError:
            return
        if not data:
            return
        dst.bio_write(data)
