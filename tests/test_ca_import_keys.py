"""``meshca ca import``'s key reading: any file gives a key or a message, never a traceback."""

from __future__ import annotations

import io
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.cli.ca_cmd import _read_key

KEY = ec.generate_private_key(ec.SECP256R1())
PLAIN = KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
LOCKED = KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.BestAvailableEncryption(b"sesame"),
)


def _read(tmp_path: Path, pem: bytes, passphrase: bytes | None) -> tuple[object, str]:
    key_file = tmp_path / "ca.key"
    key_file.write_bytes(pem)
    pass_file = None
    if passphrase is not None:
        (tmp_path / "pass").write_bytes(passphrase)
        pass_file = str(tmp_path / "pass")
    err = io.StringIO()
    with redirect_stderr(err):
        key = _read_key(key_file, pass_file)
    return key, err.getvalue()


@pytest.mark.parametrize(
    ("pem", "passphrase", "message"),
    [
        pytest.param(PLAIN, None, "", id="ok/plain"),
        pytest.param(LOCKED, b"sesame\n", "", id="ok/encrypted-with-newline"),
        pytest.param(LOCKED, None, "is encrypted", id="fail/encrypted-no-passphrase"),
        pytest.param(LOCKED, b"open", "wrong passphrase", id="fail/wrong-passphrase"),
        pytest.param(PLAIN, b"sesame", "is not encrypted", id="fail/passphrase-for-plain"),
        pytest.param(b"", None, "cannot read the key", id="fail/empty"),
        pytest.param(PLAIN[:-80], None, "cannot read the key", id="fail/truncated"),
        pytest.param(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            None,
            "cannot read the key",
            id="fail/a-certificate",
        ),
    ],
)
def test_read_key(tmp_path: Path, pem: bytes, passphrase: bytes | None, message: str) -> None:
    key, err = _read(tmp_path, pem, passphrase)
    if message:
        assert key is None and message in err
        assert "-----BEGIN" not in err and "sesame" not in err
    else:
        assert err == "" and key is not None
        assert key.public_key() == KEY.public_key()  # type: ignore[attr-defined]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(
    body=st.binary(max_size=2048),
    pem_wrapped=st.booleans(),
    passphrase=st.one_of(st.none(), st.binary(max_size=32)),
)
def test_any_bytes_give_a_key_or_a_message(
    tmp_path: Path, body: bytes, pem_wrapped: bool, passphrase: bytes | None
) -> None:
    import base64

    pem = body
    if pem_wrapped:
        pem = (
            b"-----BEGIN PRIVATE KEY-----\n"
            + base64.encodebytes(body)
            + b"-----END PRIVATE KEY-----\n"
        )
    key, err = _read(tmp_path, pem, passphrase)
    assert (key is None) == bool(err)
