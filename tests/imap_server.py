"""A real Dovecot IMAP server on loopback for tests (the MSSanté application mailbox the MDN poller reads).

``dovecot(tmp, cert_file=..., key_file=..., server_ca_file=...)`` writes a self-contained configuration under
``tmp`` (runtime dir, state, log, passwd-files, maildirs), starts ``dovecot -F`` and yields an ``ImapServer``:

* ``port``: plain IMAP offering STARTTLS; LOGIN/AUTHENTICATE are refused until STARTTLS (``disable_plaintext_auth``);
* ``tls_port``: implicit TLS (imaps);
* users ``gateway@gw.example`` / ``secret-imap-pw`` and ``other@gw.example`` / ``other-imap-pw`` ({PLAIN} scheme);
* with ``client_ca_file``: the server asks for a client certificate and offers SASL EXTERNAL, the username being
  the certificate's commonName (a valid certificate whose CN is ``gateway@gw.example`` logs in as that user).

Dovecot quirks handled here:

* Dovecot treats a connection whose remote IP equals its local IP (any loopback client of a 127.0.0.1 listener)
  as "secured", so ``disable_plaintext_auth`` would never bite on loopback. The plain port handed out is therefore
  a tiny TCP relay on 127.0.0.1 that connects to Dovecot's own plain listener from source address 127.0.0.2:
  Dovecot sees 127.0.0.2 -> 127.0.0.1 and refuses LOGIN before STARTTLS. Dovecot itself listens on 127.0.0.1 only.
* Mail processes run as ``nobody:nogroup`` and chroot into ``tmp/mail`` (home ``tmp/mail/./<user>``) so the
  maildirs are reachable even though pytest's temporary root is mode 0700; the auth process runs as root for the
  same reason (it reads the passwd-files itself).
* ``ssl_require_crl`` defaults to yes: with a CA file holding no CRL every client certificate would be "invalid".
* Dovecot 2.3.19 has no per-passdb ``mechanisms`` filter and EXTERNAL checks the passdb with an empty password,
  so with ``client_ca_file`` the single passdb is a passwd-file whose path depends on the mechanism
  (``passdb-%{mech}``): ``passdb-PLAIN``/``passdb-LOGIN`` hold the {PLAIN} passwords, ``passdb-EXTERNAL`` the same
  users with ``nopassword`` (reachable only with a valid client certificate; an empty LOGIN password still fails).
* Failed logins: ``auth_failure_delay = 0`` and the anvil ``anvil-auth-penalty`` listener is moved away (auth then
  runs without the per-IP penalty, which otherwise delays every later login from 127.0.0.1 by 2..15 s). Dovecot
  still answers a failed authentication only on its next 500 ms failure-flush tick.
* Stopping takes about 1 s: Dovecot's master waits for its log process after SIGTERM.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tests import pki

DOVECOT: str | None = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)

HOST = "127.0.0.1"
RELAY_SOURCE = "127.0.0.2"  # the relay's source address: anything on loopback but HOST
GATEWAY_USER = "gateway@gw.example"
GATEWAY_PASSWORD = "secret-imap-pw"
OTHER_USER = "other@gw.example"
OTHER_PASSWORD = "other-imap-pw"
USERS: dict[str, str] = {GATEWAY_USER: GATEWAY_PASSWORD, OTHER_USER: OTHER_PASSWORD}
MAIL_ACCOUNT = ("nobody", "nogroup")
START_TIMEOUT = 15.0


def quote_mailbox(name: str) -> str:
    """An IMAP quoted string for a mailbox name (imaplib passes arguments verbatim)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class ImapServer:
    host: str
    port: int  # plain IMAP + STARTTLS (through the relay, see the module docstring)
    tls_port: int  # implicit TLS
    log: Path
    server_ca_file: Path
    users: dict[str, str] = field(default_factory=lambda: dict(USERS))

    def ssl_context(self, *, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client context trusting the server's CA, optionally presenting ``cert`` = (cert_file, key_file)."""
        context = ssl.create_default_context(cafile=str(self.server_ca_file))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        return context

    @contextmanager
    def client(self, user: str, *, password: str | None = None) -> Iterator[imaplib.IMAP4_SSL]:
        """An imaplib client on the implicit-TLS port, logged in as ``user``; logged out at exit."""
        imap = imaplib.IMAP4_SSL(self.host, self.tls_port, ssl_context=self.ssl_context(), timeout=10)
        try:
            imap.login(user, self.users[user] if password is None else password)
            yield imap
        finally:
            imap.logout()

    def append(self, user: str, raw: bytes, folder: str = "INBOX", *, flags: Iterable[str] = ()) -> None:
        """Append ``raw`` (CRLF line endings round-trip exactly) to ``folder``, creating the folder if needed."""
        with self.client(user) as imap:
            mailbox = quote_mailbox(folder)
            if folder.upper() != "INBOX" and folder not in _list(imap):
                _ok(imap.create(mailbox), f"CREATE {folder}")
            flag_list = "(" + " ".join(flags) + ")" if flags else None
            _ok(imap.append(mailbox, flag_list, None, raw), f"APPEND {folder}")

    def messages(self, user: str, folder: str = "INBOX") -> list[tuple[int, set[str], bytes]]:
        """(uid, flags, raw) of the messages in ``folder`` not flagged \\Deleted, by ascending uid."""
        with self.client(user) as imap:
            _ok(imap.select(quote_mailbox(folder), readonly=True), f"SELECT {folder}")
            data = _ok(imap.uid("SEARCH", "NOT", "DELETED"), "UID SEARCH")
            first = data[0] if data else None
            uids = sorted(int(uid) for uid in first.split()) if isinstance(first, bytes) else []
            found: list[tuple[int, set[str], bytes]] = []
            for uid in uids:
                text, literal = b"", b""
                for item in _ok(imap.uid("FETCH", str(uid), "(UID FLAGS BODY.PEEK[])"), "UID FETCH"):
                    if isinstance(item, tuple) and isinstance(item[0], bytes) and isinstance(item[1], bytes):
                        text, literal = text + item[0], item[1]
                    elif isinstance(item, bytes):
                        text += item
                uid_match = re.search(rb"\bUID (\d+)", text)
                if uid_match is None or int(uid_match.group(1)) != uid:
                    continue  # an unsolicited FETCH (flag change by another session)
                flags_match = re.search(rb"\bFLAGS \(([^)]*)\)", text)
                flags = set(flags_match.group(1).decode().split()) if flags_match else set()
                found.append((uid, flags, literal))
            return found

    def folders(self, user: str) -> list[str]:
        """The names of ``user``'s folders (LIST "" "*")."""
        with self.client(user) as imap:
            return _list(imap)


def _ok(response: tuple[str, Sequence[object]], what: str) -> list[object]:
    status, data = response
    if status != "OK":
        raise AssertionError(f"IMAP {what} failed: {status} {data!r}")
    return list(data)


_LIST_LINE = re.compile(rb'^\((?P<flags>[^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (?P<name>.*)$')


def _list(imap: imaplib.IMAP4) -> list[str]:
    names: list[str] = []
    for item in _ok(imap.list('""', "*"), "LIST"):
        if isinstance(item, tuple):  # name sent as a literal
            names.append(bytes(item[1]).decode())
            continue
        if not isinstance(item, bytes) or (match := _LIST_LINE.match(item)) is None:
            continue
        name = match.group("name")
        if name.startswith(b'"') and name.endswith(b'"'):
            name = re.sub(rb"\\(.)", rb"\1", name[1:-1])
        names.append(name.decode())
    return names


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class _Relay:
    """Forwards connections accepted on ``listener`` to ``target``, connecting from ``source`` (see module doc)."""

    def __init__(self, listener: socket.socket, target: tuple[str, int], source: str) -> None:
        self._listener = listener
        self._target = target
        self._source = source
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="imap-relay", daemon=True)

    def start(self) -> None:
        self._listener.settimeout(0.1)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5, source_address=(self._source, 0))
            except OSError:
                downstream.close()
                continue
            downstream.settimeout(None)
            upstream.settimeout(None)
            remaining = [2]
            with self._lock:
                if self._stop.is_set():
                    downstream.close()
                    upstream.close()
                    return
                self._open.update((downstream, upstream))
                for src, dst in ((downstream, upstream), (upstream, downstream)):
                    thread = threading.Thread(target=self._pump, args=(src, dst, remaining), daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, remaining: list[int]) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    for sock in (src, dst):
                        self._open.discard(sock)
                        sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
        with self._lock:
            for sock in self._open:
                sock.close()
            self._open.clear()


def _conf_path(path: Path) -> str:
    text = str(path)
    if re.search(r'[\s"#<>%]', text):
        raise ValueError(f"path unusable in dovecot.conf: {text!r}")
    return text


def _write_config(
    tmp: Path,
    *,
    base_dir: Path,
    plain_port: int,
    tls_port: int,
    cert_file: Path,
    key_file: Path,
    client_ca_file: Path | None,
) -> tuple[Path, Path]:
    account = pwd.getpwnam(MAIL_ACCOUNT[0])
    uid, gid = account.pw_uid, account.pw_gid
    state_dir, mail_root, log = tmp / "state", tmp / "mail", tmp / "dovecot.log"
    for directory in (state_dir, mail_root):
        directory.mkdir(parents=True, exist_ok=True)
    os.chown(mail_root, uid, gid)
    (mail_root / "tmp").mkdir(exist_ok=True)  # mail_temp_dir (/tmp) as seen from inside the chroot
    os.chmod(mail_root / "tmp", 0o1777)

    for user in USERS:  # Dovecot chdir()s to the home before it would create the maildir
        (mail_root / user).mkdir(exist_ok=True)
        os.chown(mail_root / user, uid, gid)
    users_file = tmp / "users.passwd"
    # user:password:uid:gid:gecos:home:shell:extra (uid/gid empty: mail_uid/mail_gid apply)
    users = "".join(f"{user}:{{PLAIN}}{password}::::{mail_root}/./{user}::\n" for user, password in USERS.items())
    users_file.write_text(users)
    passdb_file = _conf_path(users_file)
    mechanisms = "plain login"
    tls_client = ""
    if client_ca_file is not None:
        # one passwd-file per mechanism: EXTERNAL verifies an empty password, so its users are password-less
        mechanisms = "plain login external"
        for mech in ("PLAIN", "LOGIN"):
            (tmp / f"passdb-{mech}").write_text(users)
        (tmp / "passdb-EXTERNAL").write_text("".join(f"{user}:::::::nopassword=y\n" for user in USERS))
        passdb_file = f"{_conf_path(tmp)}/passdb-%{{mech}}"
        tls_client = f"""
ssl_ca = <{_conf_path(client_ca_file)}
ssl_verify_client_cert = yes
ssl_require_crl = no
auth_ssl_username_from_cert = yes
ssl_cert_username_field = commonName
"""
    conf = tmp / "dovecot.conf"
    conf.write_text(f"""# generated by tests/imap_server.py
protocols = imap
listen = {HOST}
base_dir = {_conf_path(base_dir)}
state_dir = {_conf_path(state_dir)}
instance_name = dovecot-test
log_path = {_conf_path(log)}
info_log_path = {_conf_path(log)}
debug_log_path = {_conf_path(log)}
auth_verbose = yes
auth_failure_delay = 0
shutdown_clients = yes

default_internal_user = dovecot
default_login_user = dovenull
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
valid_chroot_dirs = {_conf_path(mail_root)}
mail_location = maildir:~/Maildir
mail_fsync = never
namespace inbox {{
  inbox = yes
  separator = /
}}

ssl = yes
ssl_cert = <{_conf_path(cert_file)}
ssl_key = <{_conf_path(key_file)}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = {mechanisms}
{tls_client}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passdb_file}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {_conf_path(users_file)}
}}

service auth {{
  user = root
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    path = anvil-auth-penalty-disabled
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {plain_port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {tls_port}
    ssl = yes
  }}
}}
protocol imap {{
  mail_max_userip_connections = 100
}}
""")
    return conf, log


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@contextmanager
def dovecot(
    tmp: Path,
    *,
    cert_file: Path,
    key_file: Path,
    server_ca_file: Path,
    client_ca_file: Path | None = None,
) -> Iterator[ImapServer]:
    """Run Dovecot (see the module docstring) with everything under ``tmp``; stopped at exit.

    ``cert_file``/``key_file``: the server certificate (PEM, for 127.0.0.1) and its key; ``server_ca_file``: the
    CA the helpers trust for it; ``client_ca_file``: when given, client certificates issued by this CA may log in
    with SASL EXTERNAL as their commonName.
    """
    if DOVECOT is None:
        raise RuntimeError("dovecot is not installed")
    tmp = tmp.resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    base_dir = tmp / "run"
    short_base: Path | None = None
    if len(str(base_dir)) > 60:  # unix socket paths (base_dir/login/imap, ...) must stay under 108 bytes
        short_base = Path(tempfile.mkdtemp(prefix="dovecot-"))
        base_dir = short_base / "run"
    listener = socket.socket()
    try:
        listener.bind((HOST, 0))
        listener.listen(16)
        port: int = listener.getsockname()[1]
        internal_port, tls_port = _free_port(HOST), _free_port(HOST)
        conf, log = _write_config(
            tmp,
            base_dir=base_dir,
            plain_port=internal_port,
            tls_port=tls_port,
            cert_file=cert_file,
            key_file=key_file,
            client_ca_file=client_ca_file,
        )
        stderr_path = tmp / "dovecot.stderr"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        relay = _Relay(listener, (HOST, internal_port), RELAY_SOURCE)
        relay.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not (_accepts(HOST, internal_port) and _accepts(HOST, tls_port)):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"dovecot did not start (exit code {process.poll()}):\n"
                        f"--- stderr ---\n{_read(stderr_path)}\n--- {log} ---\n{_read(log)}"
                    )
                time.sleep(0.05)
            yield ImapServer(host=HOST, port=port, tls_port=tls_port, log=log, server_ca_file=server_ca_file)
        finally:
            relay.stop()
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
    finally:
        listener.close()
        if short_base is not None:
            shutil.rmtree(short_base, ignore_errors=True)


@cache
def _issued() -> dict[str, Any]:
    """The test PKI, made once per session: a server CA and the server's certificate, a client CA (it
    stands for IGC-Santé) and the gateway mailbox's certificate, and a stranger's from another CA."""
    server_ca, client_ca = pki.ca("IMAP server CA"), pki.ca("IMAP client CA")
    return {
        "server_ca": server_ca,
        "client_ca": client_ca,
        "server": pki.issue(server_ca, "localhost", server=True),
        "gateway": pki.issue(client_ca, GATEWAY_USER, client=True),
        "stranger": pki.issue(pki.ca("Some other CA"), GATEWAY_USER, client=True),
    }


def write_pki(tmp: Path) -> dict[str, Path]:
    """The test PKI's files under ``tmp/pki``: ``server_ca``, ``client_ca`` and ``<name>_cert`` /
    ``<name>_key`` for ``server``, ``gateway`` and ``stranger``."""
    issued = _issued()
    directory = tmp / "pki"
    directory.mkdir()
    paths = {"server_ca": directory / "server-ca.crt", "client_ca": directory / "client-ca.crt"}
    paths["server_ca"].write_bytes(issued["server_ca"].cert_pem)
    paths["client_ca"].write_bytes(issued["client_ca"].cert_pem)
    for name in ("server", "gateway", "stranger"):
        paths[f"{name}_cert"], paths[f"{name}_key"] = issued[name].write(directory, name)
    return paths


@contextmanager
def dovecot_for(tmp: Path, paths: Mapping[str, Path], *, client_certificates: bool = True) -> Iterator[ImapServer]:
    """:func:`dovecot` with :func:`write_pki`'s files (``client_certificates``: SASL EXTERNAL too)."""
    with dovecot(
        tmp / "dovecot",
        cert_file=paths["server_cert"],
        key_file=paths["server_key"],
        server_ca_file=paths["server_ca"],
        client_ca_file=paths["client_ca"] if client_certificates else None,
    ) as server:
        yield server
