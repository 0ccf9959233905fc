"""HL7 v2 messages as hospital systems send them, built from the fixture letters (for the MLLP tests).

The S1 letter's patient: test INS-NIR 244037511305285 (OID 1.2.250.1.213.1.4.10) and IPP
IPP0004527891 (OID 1.2.250.1.213.1.1.9.1.1); PID-3 here says the same unless told otherwise.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Sequence

from tests.conftest import FIXTURES

__all__ = ["CDA_S1", "PDF", "S1_PID", "ed", "frame", "message", "msh", "pid", "read_ack", "send_all"]

CDA_S1 = (FIXTURES / "cda" / "ldl-ses-s1-2022.xml").read_bytes()
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
S1_PID = (
    "IPP0004527891^^^CHU-PARIS&1.2.250.1.213.1.1.9.1.1&ISO^PI",
    "244037511305285^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS",
)
START, END = b"\x0b", b"\x1c\r"


def msh(
    kind: str = "MDM^T02^MDM_T02",
    control: str = "MSG00001",
    *,
    processing: str = "P",
    version: str = "2.5",
    charset: str = "UNICODE UTF-8",
    sender: str = "DPI",
    facility: str = "CHU-PARIS",
) -> str:
    return (
        f"MSH|^~\\&|{sender}|{facility}|GATEWAY|GW|20261105100000||{kind}|{control}|{processing}|{version}"
        f"|||||FRA|{charset}"
    )


def pid(*ids: str) -> str:
    return f"PID|1||{'~'.join(ids or S1_PID)}||DUPONT^MARIE||19440305|F"


def ed(
    n: int,
    data: bytes,
    *,
    subtype: str = "XML",
    kind: str = "TEXT",
    encoding: str = "Base64",
    ident: str = "11490-0^Lettre de liaison a la sortie^LN",
    sub_id: str = "",
    text: str | None = None,
) -> str:
    """An OBX of value type ED (``text`` replaces the base64 of ``data``)."""
    payload = text if text is not None else base64.b64encode(data).decode()
    return f"OBX|{n}|ED|{ident}|{sub_id}|^{kind}^{subtype}^{encoding}^{payload}||||||F"


def message(*segments: str, sep: str = "\r", encoding: str = "utf-8") -> bytes:
    return (sep.join(segments) + sep).encode(encoding)


def mdm(cda: bytes = CDA_S1, control: str = "MSG00001", **kw: str) -> bytes:
    """MDM^T02 carrying ``cda`` base64 in one OBX (the common case)."""
    return message(
        msh("MDM^T02^MDM_T02", control, **kw),
        "EVN|T02|20261105100000",
        pid(),
        "PV1|1|I",
        "TXA|1|11490-0|AP|20261105||||||||DOC-0001||||||AU",
        ed(1, cda),
    )


def frame(raw: bytes) -> bytes:
    return START + raw + END


def read_ack(sock: socket.socket) -> bytes:
    """One MLLP frame from ``sock`` (without its framing); b"" when the peer closed first."""
    data = b""
    while not data.endswith(END):
        chunk = sock.recv(65536)
        if not chunk:
            return b""
        data += chunk
    assert data.startswith(START), data[:20]
    return data[1:-2]


def send_all(port: int, messages: Sequence[bytes], timeout: float = 30.0) -> list[bytes]:
    """Send each message on one connection, waiting for each ACK (as MLLP senders do)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        acks = []
        for raw in messages:
            sock.sendall(frame(raw))
            acks.append(read_ack(sock))
        return acks
