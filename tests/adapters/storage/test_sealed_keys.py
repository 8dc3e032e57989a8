"""Keys sealed in the database: what one replica stores, another with the same
key-encryption key loads; anything else is refused with a message that says why."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, text, update

from meshca.adapters.keys.files import FileKeyManager
from meshca.adapters.keys.log_key import (
    load_or_create_log_key,
    load_or_create_shared_log_key,
)
from meshca.adapters.keys.sealed import (
    LOG_KEY_REF,
    KeyEncryptionKey,
    SealedKeyManager,
    SealedKeys,
)
from meshca.adapters.storage.tables import SealedKeyRow
from meshca.core.errors import BackendUnavailable

KEK = KeyEncryptionKey(bytes(range(32)))
OTHER_KEK = KeyEncryptionKey(bytes(32))


def _manager(
    engine: Engine, tmp_path: Path, kek: KeyEncryptionKey | None = KEK
) -> SealedKeyManager:
    return SealedKeyManager(SealedKeys(engine, kek), FileKeyManager(tmp_path / "ca"))


def _same(a: ec.EllipticCurvePrivateKey, b: object) -> bool:
    assert isinstance(b, ec.EllipticCurvePrivateKey)
    return a.private_numbers() == b.private_numbers()


def test_a_key_stored_by_one_replica_loads_on_another(engine: Engine, tmp_path: Path) -> None:
    ref, key = _manager(engine, tmp_path / "a").create("intermediate")
    assert ref.startswith("sealed:intermediate-")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    other_host = _manager(engine, tmp_path / "b")
    assert _same(key, other_host.load(ref))
    assert ref in other_host.key_refs()


def test_the_database_never_holds_the_key_in_clear(engine: Engine, tmp_path: Path) -> None:
    ref, key = _manager(engine, tmp_path).create("root")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    secret = key.private_numbers().private_value.to_bytes(32, "big")
    with engine.connect() as connection:
        (blob,) = connection.execute(
            text("SELECT ciphertext FROM sealed_key WHERE ref = :ref"), {"ref": ref}
        ).one()
    assert secret not in bytes(blob)


def test_another_key_encryption_key_is_named_not_guessed(engine: Engine, tmp_path: Path) -> None:
    ref, _ = _manager(engine, tmp_path).create("root")
    with pytest.raises(BackendUnavailable, match=f"sealed with key-encryption key {KEK.id}"):
        _manager(engine, tmp_path, OTHER_KEK).load(ref)
    with pytest.raises(BackendUnavailable, match="needs --key-encryption-key-file"):
        _manager(engine, tmp_path, None).load(ref)


def test_a_row_altered_or_moved_does_not_decrypt(engine: Engine, tmp_path: Path) -> None:
    manager = _manager(engine, tmp_path)
    ref, _ = manager.create("root")
    with engine.begin() as connection:
        connection.execute(
            update(SealedKeyRow).where(SealedKeyRow.ref == ref).values(ref="sealed:root-moved")
        )
    with pytest.raises(BackendUnavailable, match="does not decrypt"):
        manager.load("sealed:root-moved")
    with pytest.raises(BackendUnavailable, match="is not in the database"):
        manager.load(ref)


def test_delete_and_file_keys_of_an_older_ca(engine: Engine, tmp_path: Path) -> None:
    files = FileKeyManager(tmp_path / "ca")
    file_ref, file_key = files.create("root")
    manager = _manager(engine, tmp_path)
    assert isinstance(file_key, ec.EllipticCurvePrivateKey)
    assert _same(file_key, manager.load(file_ref))
    ref, _ = manager.create("intermediate")
    assert set(manager.key_refs()) == {ref, file_ref}
    manager.delete(ref)
    manager.delete(file_ref)
    assert manager.key_refs() == []


def test_a_file_key_on_another_host_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="--key-encryption-key-file"):
        FileKeyManager(tmp_path / "empty").load("file:keys/intermediate-abc.key")


def test_replicas_share_one_log_key_and_keep_a_pinned_one(engine: Engine, tmp_path: Path) -> None:
    pinned = load_or_create_log_key(tmp_path / "first")  # a single host's existing key
    first = load_or_create_shared_log_key(SealedKeys(engine, KEK), tmp_path / "first")
    second = load_or_create_shared_log_key(SealedKeys(engine, KEK), tmp_path / "second")
    assert _same(pinned, first) and _same(pinned, second)
    assert not (tmp_path / "second" / "log").exists()
    # Its public half is readable without the key-encryption key (auditors' tools).
    public = SealedKeys(engine, None).public_key_der(LOG_KEY_REF)
    assert public is not None
    assert LOG_KEY_REF not in _manager(engine, tmp_path).key_refs()


def test_the_same_reference_is_never_overwritten(engine: Engine) -> None:
    keys = SealedKeys(engine, KEK)
    one, two = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    assert keys.put("sealed:x", one)
    assert not keys.put("sealed:x", two)
    assert _same(one, keys.get("sealed:x"))


def test_key_encryption_key_files(tmp_path: Path) -> None:
    good = tmp_path / "kek"
    good.write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    assert KeyEncryptionKey.from_file(good).id == KEK.id
    short = tmp_path / "short"
    short.write_text(base64.b64encode(bytes(16)).decode())
    with pytest.raises(ValueError, match="16 bytes, not 32"):
        KeyEncryptionKey.from_file(short)
    with pytest.raises(ValueError, match="cannot read"):
        KeyEncryptionKey.from_file(tmp_path / "missing")


@given(st.binary(max_size=80))
def test_any_file_content_is_a_key_or_a_clear_refusal(content: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile() as handle:
        handle.write(content)
        handle.flush()
        try:
            kek = KeyEncryptionKey.from_file(Path(handle.name))
        except ValueError as error:
            assert "key-encryption-key-file" in str(error)
        else:
            assert len(kek.id) == 16
