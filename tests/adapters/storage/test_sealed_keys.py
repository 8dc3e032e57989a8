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
    KeyRing,
    SealedKeyManager,
    SealedKeys,
)
from meshca.adapters.storage.tables import SealedKeyRow
from meshca.core.errors import BackendUnavailable

KEK = KeyEncryptionKey(bytes(range(32)))
OTHER_KEK = KeyEncryptionKey(bytes(32))
RING = KeyRing([KEK])
OTHER_RING = KeyRing([OTHER_KEK])


def _manager(engine: Engine, tmp_path: Path, ring: KeyRing | None = RING) -> SealedKeyManager:
    return SealedKeyManager(SealedKeys(engine, ring), FileKeyManager(tmp_path / "ca"))


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
        _manager(engine, tmp_path, OTHER_RING).load(ref)
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
    first = load_or_create_shared_log_key(SealedKeys(engine, RING), tmp_path / "first")
    second = load_or_create_shared_log_key(SealedKeys(engine, RING), tmp_path / "second")
    assert _same(pinned, first) and _same(pinned, second)
    assert not (tmp_path / "second" / "log").exists()
    # Its public half is readable without the key-encryption key (auditors' tools).
    public = SealedKeys(engine, None).public_key_der(LOG_KEY_REF)
    assert public is not None
    assert LOG_KEY_REF not in _manager(engine, tmp_path).key_refs()


def test_the_same_reference_is_never_overwritten(engine: Engine) -> None:
    keys = SealedKeys(engine, RING)
    one, two = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    assert keys.put("sealed:x", one)
    assert not keys.put("sealed:x", two)
    assert _same(one, keys.get("sealed:x"))


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_key_encryption_key_files(tmp_path: Path) -> None:
    good = tmp_path / "kek"
    good.write_text(_b64(bytes(range(32))) + "\n")
    assert KeyRing.from_file(good).sealing.id == KEK.id
    two = tmp_path / "two"
    two.write_text(f"# the new key first\n{_b64(bytes(32))}\n\n{_b64(bytes(range(32)))}\n")
    ring = KeyRing.from_file(two)
    assert ring.sealing.id == OTHER_KEK.id and ring.ids == [OTHER_KEK.id, KEK.id]
    short = tmp_path / "short"
    short.write_text(f"{_b64(bytes(range(32)))}\n{_b64(bytes(16))}")
    with pytest.raises(ValueError, match="line 2 holds 16 bytes, not 32"):
        KeyRing.from_file(short)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        KeyRing.from_file(empty)
    with pytest.raises(ValueError, match="cannot read"):
        KeyRing.from_file(tmp_path / "missing")


def test_replacing_the_key_encryption_key(engine: Engine, tmp_path: Path) -> None:
    """New key first, old key second on every replica; reseal; drop the old key."""
    ref, key = _manager(engine, tmp_path, RING).create("intermediate")
    log_key = load_or_create_shared_log_key(SealedKeys(engine, RING), tmp_path)
    both = KeyRing([OTHER_KEK, KEK])
    assert _same(key, _manager(engine, tmp_path, both).load(ref))  # during the change
    assert SealedKeys(engine, both).reseal() == (2, 0)
    assert SealedKeys(engine, both).reseal() == (0, 2)  # a rerun has nothing left to do
    assert _same(key, _manager(engine, tmp_path, OTHER_RING).load(ref))
    assert _same(log_key, SealedKeys(engine, OTHER_RING).get(LOG_KEY_REF))
    with pytest.raises(BackendUnavailable, match=f"sealed with key-encryption key {OTHER_KEK.id}"):
        _manager(engine, tmp_path, RING).load(ref)


@given(st.binary(max_size=80))
def test_any_file_content_is_a_key_or_a_clear_refusal(content: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile() as handle:
        handle.write(content)
        handle.flush()
        try:
            ring = KeyRing.from_file(Path(handle.name))
        except ValueError as error:
            assert "key-encryption-key-file" in str(error)
        else:
            assert ring.ids and all(len(i) == 16 for i in ring.ids)


def test_reseal_keys_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from meshca import app
    from meshca.cli import main as meshca_main
    from meshca.config import Settings

    old = tmp_path / "kek"
    old.write_text(_b64(bytes(range(32))))
    settings = Settings(
        data_dir=tmp_path / "data",
        k8s_mode="jwks",
        k8s_issuer="https://issuer.test",
        key_encryption_key_file=old,
    )
    app.prepare(settings)  # root, intermediate, JWT-SVID and log keys, sealed
    both = tmp_path / "both"
    both.write_text(f"{_b64(bytes(32))}\n{_b64(bytes(range(32)))}\n")
    flags = ["--data-dir", str(settings.data_dir), "--key-encryption-key-file"]

    assert meshca_main(["ca", "reseal-keys", *flags, str(both)]) == 0
    assert f"re-sealed 4 keys under key-encryption key {OTHER_KEK.id}; 0 already were" in (
        capsys.readouterr().out
    )
    assert meshca_main(["ca", "status", *flags, str(old)]) != 0
    assert "give every replica the same --key-encryption-key-file" in capsys.readouterr().err
    assert meshca_main(["ca", "reseal-keys", "--data-dir", str(settings.data_dir)]) == 2
