"""The selfpipe: signals become bytes on a pipe, handlers are restored."""

import os
import select
import signal

from s6tls.selfpipe import SelfPipe


def test_sigchld_arrives_as_a_byte_and_handlers_come_back():
    before = signal.getsignal(signal.SIGHUP)
    with SelfPipe((signal.SIGCHLD, signal.SIGHUP)) as sp:
        assert sp.read() == []
        pid = os.fork()
        if pid == 0:
            os._exit(3)
        poller = select.poll()
        poller.register(sp.fileno(), select.POLLIN)
        assert poller.poll(10000), "no SIGCHLD on the selfpipe"
        os.kill(os.getpid(), signal.SIGHUP)  # no work in the handler: it only lands on the pipe
        got = sp.read() + sp.read()
        assert signal.SIGCHLD in got and signal.SIGHUP in got
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 3
        fd = sp.fileno()
    assert signal.getsignal(signal.SIGHUP) is before
    try:
        os.fstat(fd)
    except OSError:
        pass
    else:
        raise AssertionError("the selfpipe was left open")
