//! Client-side encryption of epoch objects (`--encrypt-key FILE`): the
//! object store's operator sees sizes, ids and times (MANIFEST), never
//! guest memory. XChaCha20-Poly1305 over 1 MiB chunks (docs/FORMAT.md,
//! "Encrypted objects").

use std::io::Read;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use thiserror::Error;

/// First bytes of an encrypted object.
pub const MAGIC: &[u8; 8] = b"CSNPENC1";
/// Size of an encrypted object's head.
pub const HEAD: usize = 64;
/// Plaintext bytes per chunk.
pub const CHUNK: usize = 1 << 20;
/// Bytes the AEAD adds to a chunk.
pub const TAG_LEN: usize = 16;

/// Why a key file or an encrypted object cannot be used.
#[derive(Debug, Error)]
pub enum SealError {
    /// The key file cannot be read.
    #[error("--encrypt-key {path}: {source}")]
    ReadKey {
        /// The key file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file holds no key.
    #[error("--encrypt-key {path}: not a key (32 bytes, or 64 hex digits; e.g. `openssl rand -hex 32 > FILE`)")]
    NotAKey {
        /// The key file.
        path: PathBuf,
    },
    /// No random bytes for a new object's nonce.
    #[error("cannot read /dev/urandom for a nonce: {0}")]
    Nonce(#[source] std::io::Error),
    /// An object without the head of an encrypted one.
    #[error("not an encrypted consnap object")]
    NotSealed,
    /// An encrypted object this consnap does not read.
    #[error("an encrypted object of another version or chunk size")]
    OtherFormat,
    /// An object encrypted with another key.
    #[error("encrypted with key {found}, not with the key given ({given})")]
    OtherKey {
        /// The id of the key the object was encrypted with, hex.
        found: String,
        /// The id of the key given, hex.
        given: String,
    },
    /// A chunk shorter than its tag.
    #[error("chunk {0} is cut short")]
    CutShort(u64),
    /// A chunk that does not authenticate.
    #[error("chunk {0} fails authentication (damaged, or moved from another object)")]
    Forged(u64),
}

/// A key read from a key file, and its id.
#[derive(Clone)]
pub struct SealKey {
    cipher: XChaCha20Poly1305,
    id: [u8; 16],
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealKey({})", self.id_hex())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 32 bytes from 64 hex digits (and nothing else).
fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

impl SealKey {
    /// The key in `path`: 32 bytes, or 64 hex digits (surrounding
    /// whitespace ignored), such as `head -c 32 /dev/urandom > key` or
    /// `openssl rand -hex 32 > key` make.
    pub fn load(path: &Path) -> Result<SealKey, SealError> {
        let raw = std::fs::read(path).map_err(|source| SealError::ReadKey {
            path: path.to_path_buf(),
            source,
        })?;
        let text = std::str::from_utf8(&raw).map(str::trim).unwrap_or("");
        let key = match <[u8; 32]>::try_from(raw.as_slice()) {
            Ok(k) => Some(k),
            Err(_) => unhex32(text),
        };
        let key = key.ok_or_else(|| SealError::NotAKey {
            path: path.to_path_buf(),
        })?;
        Ok(SealKey::from_bytes(key))
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(key: [u8; 32]) -> SealKey {
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&key));
        // The id: the AEAD's tag over nothing, under a nonce no object
        // uses (object nonces start with 16 random bytes, this one with
        // zeros and a label): it tells keys apart and reveals nothing of them.
        let mut nonce = [0u8; 24];
        nonce[16..].copy_from_slice(b"keyid\0\0\0");
        let tag = cipher
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), b"consnap key id", &mut [])
            .unwrap_or_default();
        let mut id = [0u8; 16];
        id.copy_from_slice(&tag);
        SealKey { cipher, id }
    }

    /// The key's id.
    pub fn id(&self) -> [u8; 16] {
        self.id
    }

    /// The key's id in hex.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    /// The head of a new encrypted object of `len` plaintext bytes.
    pub fn head(&self, len: u64) -> Result<[u8; HEAD], SealError> {
        let mut h = [0u8; HEAD];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[12..16].copy_from_slice(&(CHUNK as u32).to_le_bytes());
        h[16..24].copy_from_slice(&len.to_le_bytes());
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut h[24..40]))
            .map_err(SealError::Nonce)?;
        h[40..56].copy_from_slice(&self.id);
        Ok(h)
    }

    /// Check the head of an encrypted object; its plaintext length.
    pub fn open_head(&self, head: &[u8]) -> Result<u64, SealError> {
        if head.len() < HEAD || &head[..8] != MAGIC {
            return Err(SealError::NotSealed);
        }
        let u32_at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        if u32_at(8) != 1 || u32_at(12) as usize != CHUNK {
            return Err(SealError::OtherFormat);
        }
        if head[40..56] != self.id {
            return Err(SealError::OtherKey {
                found: hex(&head[40..56]),
                given: self.id_hex(),
            });
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[16..24]);
        Ok(u64::from_le_bytes(len))
    }

    fn nonce(head: &[u8], index: u64) -> XNonce {
        let mut n = [0u8; 24];
        n[..16].copy_from_slice(&head[24..40]);
        n[16..].copy_from_slice(&index.to_le_bytes());
        *XNonce::from_slice(&n)
    }

    /// What chunk `index` is bound to: the head, the object's name, its
    /// place and whether it is the last one (so chunks cannot be moved
    /// between objects, reordered, or cut off).
    fn aad(head: &[u8], object: &str, index: u64, last: bool) -> Vec<u8> {
        let mut a = Vec::with_capacity(HEAD + object.len() + 9);
        a.extend_from_slice(&head[..HEAD]);
        a.extend_from_slice(object.as_bytes());
        a.extend_from_slice(&index.to_le_bytes());
        a.push(u8::from(last));
        a
    }

    /// Encrypt chunk `index` of object `object` in place and append its tag.
    pub fn seal_chunk(&self, head: &[u8; HEAD], object: &str, index: u64, last: bool, buf: &mut Vec<u8>) {
        let aad = Self::aad(head, object, index, last);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&Self::nonce(head, index), &aad, buf)
            .unwrap_or_default();
        buf.extend_from_slice(&tag);
    }

    /// Decrypt sealed chunk `index` in place; the plaintext is the first
    /// `sealed.len() - TAG_LEN` bytes.
    pub fn open_chunk(
        &self,
        head: &[u8],
        object: &str,
        index: u64,
        last: bool,
        sealed: &mut [u8],
    ) -> Result<(), SealError> {
        if sealed.len() < TAG_LEN {
            return Err(SealError::CutShort(index));
        }
        let (text, tag) = sealed.split_at_mut(sealed.len() - TAG_LEN);
        let aad = Self::aad(head, object, index, last);
        self.cipher
            .decrypt_in_place_detached(&Self::nonce(head, index), &aad, text, Tag::from_slice(tag))
            .map_err(|_| SealError::Forged(index))
    }

    /// Decrypt in place the sealed chunks that `stored` holds back to
    /// back, chunk `first` first, of object `object` of `len` plaintext
    /// bytes; returns each chunk's index and where its plaintext lies in
    /// `stored`.
    pub fn open_chunks(
        &self,
        head: &[u8],
        object: &str,
        len: u64,
        first: u64,
        stored: &mut [u8],
    ) -> Result<Vec<(u64, std::ops::Range<usize>)>, SealError> {
        let n = chunks(len);
        let (mut at, mut i, mut out) = (0usize, first, Vec::new());
        while at < stored.len() {
            let r = chunk_range(len, i);
            let size = (r.end - r.start) as usize;
            let sealed = stored.get_mut(at..at + size).ok_or(SealError::CutShort(i))?;
            self.open_chunk(head, object, i, i + 1 == n, sealed)?;
            out.push((i, at..at + size - TAG_LEN));
            at += size;
            i += 1;
        }
        Ok(out)
    }
}

/// Plaintext chunks of an object of `len` bytes.
pub fn chunks(len: u64) -> u64 {
    len.div_ceil(CHUNK as u64)
}

/// Size of the encrypted object of `len` plaintext bytes.
pub fn sealed_len(len: u64) -> u64 {
    HEAD as u64 + len + chunks(len) * TAG_LEN as u64
}

/// Byte range of sealed chunk `i` of an object of `len` plaintext bytes.
pub fn chunk_range(len: u64, i: u64) -> std::ops::Range<u64> {
    let start = HEAD as u64 + i * (CHUNK + TAG_LEN) as u64;
    let plain = (len - i * CHUNK as u64).min(CHUNK as u64);
    start..start + plain + TAG_LEN as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_chunks_open_only_in_place_and_with_the_key() {
        let k = SealKey::from_bytes([7; 32]);
        let other = SealKey::from_bytes([8; 32]);
        assert_ne!(k.id(), other.id());
        let head = k.head(3 * CHUNK as u64 - 5).unwrap();
        assert_eq!(k.open_head(&head).unwrap(), 3 * CHUNK as u64 - 5);
        assert!(other.open_head(&head).unwrap_err().to_string().contains(&k.id_hex()));
        let plain: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
        let mut buf = plain.clone();
        k.seal_chunk(&head, "epochs/a", 1, false, &mut buf);
        assert_eq!(buf.len(), CHUNK + TAG_LEN);
        assert_ne!(&buf[..CHUNK], &plain[..]);
        let good = buf.clone();
        k.open_chunk(&head, "epochs/a", 1, false, &mut buf).unwrap();
        assert_eq!(&buf[..CHUNK], &plain[..]);
        // Another place, another object, the last flag, a flipped bit, another key.
        for (obj, i, last, flip) in [
            ("epochs/a", 2, false, false),
            ("epochs/b", 1, false, false),
            ("epochs/a", 1, true, false),
            ("epochs/a", 1, false, true),
        ] {
            let mut b = good.clone();
            if flip {
                b[100] ^= 1;
            }
            assert!(
                k.open_chunk(&head, obj, i, last, &mut b).is_err(),
                "{obj} {i} {last} {flip}"
            );
        }
        let mut b = good.clone();
        assert!(other.open_chunk(&head, "epochs/a", 1, false, &mut b).is_err());
        assert_eq!(sealed_len(0), HEAD as u64);
        assert_eq!(
            chunk_range(CHUNK as u64 + 1, 1),
            (HEAD + CHUNK + TAG_LEN) as u64..(HEAD + CHUNK + 2 * TAG_LEN + 1) as u64
        );
    }

    #[test]
    fn key_files_are_raw_or_hex() {
        let dir = std::env::temp_dir().join(format!("consnap-seal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("raw");
        std::fs::write(&raw, [9u8; 32]).unwrap();
        let hexf = dir.join("hex");
        std::fs::write(&hexf, format!("{}\n", "09".repeat(32))).unwrap();
        assert_eq!(SealKey::load(&raw).unwrap().id(), SealKey::load(&hexf).unwrap().id());
        let bad = dir.join("bad");
        std::fs::write(&bad, "short").unwrap();
        assert_eq!(
            SealKey::load(&bad).unwrap_err().to_string(),
            format!(
                "--encrypt-key {}: not a key (32 bytes, or 64 hex digits; e.g. `openssl rand -hex 32 > FILE`)",
                bad.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
