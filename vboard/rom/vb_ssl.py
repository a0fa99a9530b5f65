# `ssl` on the virtual board: TLS runs in the unix port's own ssl module over the real socket
# under the board's socket wrapper (reads and writes then block natively, so scheduled
# callbacks wait for them: keep TLS socket timeouts short, as on the board).

import ssl as _ssl

import vb_hal as hal

CERT_NONE = getattr(_ssl, "CERT_NONE", 0)
CERT_OPTIONAL = getattr(_ssl, "CERT_OPTIONAL", 1)
CERT_REQUIRED = getattr(_ssl, "CERT_REQUIRED", 2)
PROTOCOL_TLS_CLIENT = getattr(_ssl, "PROTOCOL_TLS_CLIENT", 0)
PROTOCOL_TLS_SERVER = getattr(_ssl, "PROTOCOL_TLS_SERVER", 1)
SSLContext = getattr(_ssl, "SSLContext", None)


def _native_blocking(sock):
    native = getattr(sock, "_s", sock)
    native.setblocking(True)
    return native


def wrap_socket(
    sock,
    server_side=False,
    key=None,
    cert=None,
    cert_reqs=CERT_NONE,
    cadata=None,
    server_hostname=None,
    do_handshake=True,
):
    kwargs = {"server_side": server_side, "do_handshake": do_handshake}
    if server_hostname is not None:
        kwargs["server_hostname"] = server_hostname
    if key is not None:
        kwargs["key"] = key
        kwargs["cert"] = cert
    if cadata is not None:
        kwargs["cadata"] = cadata
        kwargs["cert_reqs"] = cert_reqs
    hal.note("tls", True)
    return _ssl.wrap_socket(_native_blocking(sock), **kwargs)
