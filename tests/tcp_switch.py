"""A storage outage on demand: a TCP relay in front of a real server that can be switched off and on.

Off, the relay resets every connection: those it carried, cut mid-stream, and each new one as soon as it
is made, as an endpoint whose servers went away does behind a load balancer. Off silently, it answers
nothing and closes nothing, as a NAT or load balancer that forgot its connections does: those it
carried stay open and swallow what is sent, for good, and so does each new one until it is on again. The server behind the relay keeps its state, so the outage
ends with nothing lost. (The relay keeps listening: giving the port up and binding it again could fail
while the cut connections linger.)
"""

from __future__ import annotations

import socket
import struct
import threading


class TcpSwitch:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        self.host, self.upstream_port = host, upstream_port
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._forgotten: set[socket.socket] = set()
        self._up = True
        self._silent = False
        self._listener = socket.socket()
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def on(self) -> None:
        with self._lock:
            self._up, self._silent = True, False

    def off(self, silently: bool = False) -> None:
        with self._lock:
            self._up, self._silent = False, silently
            if silently:
                self._forgotten |= self._connections
            else:
                for connection in self._connections:
                    _reset(connection)
            self._connections.clear()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            with self._lock:
                up, silent = self._up, self._silent
            if silent:
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            if not up:
                _reset(client)
                continue
            try:
                server = socket.create_connection((self.host, self.upstream_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if not self._up:  # switched off while connecting
                    _reset(client)
                    _reset(server)
                    continue
                self._connections.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if sink in self._forgotten or source in self._forgotten:
                    continue
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    @staticmethod
    def _swallow(connection: socket.socket) -> None:
        """Read and drop what a connection made during a silent outage sends, answering nothing."""
        try:
            while connection.recv(65536):
                pass
        except OSError:
            pass


def _reset(connection: socket.socket) -> None:
    """Close with a reset (RST), not an orderly end: the peer sees the connection fail.

    The shutdown wakes a relay thread blocked reading the socket: until that read returns, the kernel
    keeps the socket alive, and a close alone would leave the peer waiting on a connection nobody serves.
    """
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        connection.close()
    except OSError:
        pass
