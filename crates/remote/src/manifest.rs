//! MANIFEST: which objects form a remote store (docs/FORMAT.md, "Remote
//! stores"). Written last, after every object it names, so that the
//! remote store is whole at every instant.

use thiserror::Error;

/// First line of every manifest.
pub const MAGIC: &str = "consnap-remote 1";

/// Why a MANIFEST does not decode: damaged, cut short, or not a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ManifestError {
    /// Bytes that are not text.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// No `end` line: cut short, or not a manifest.
    #[error("no end line (cut short?)")]
    NoEnd,
    /// An `end` line without a checksum.
    #[error("bad end line")]
    BadEnd,
    /// The checksum on the `end` line is not the body's.
    #[error("checksum mismatch")]
    Checksum,
    /// A first line that is not [`MAGIC`].
    #[error("first line is not {MAGIC:?}")]
    Magic,
    /// A line that must be there is not.
    #[error("no {0} line")]
    NoLine(&'static str),
    /// The store line holds no UUID.
    #[error("bad store UUID")]
    StoreUuid,
    /// The generation line holds no number.
    #[error("bad generation")]
    Generation,
    /// The encryption line holds no key id.
    #[error("bad key id")]
    KeyId,
    /// An epoch line that does not parse, or is out of order.
    #[error("epoch line {number}: {line:?}")]
    EpochLine {
        /// 1-based, among the epoch lines.
        number: usize,
        /// The line.
        line: String,
    },
}

/// One epoch of a remote store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Epoch id.
    pub id: u64,
    /// Its parent (none: a full epoch).
    pub parent: Option<u64>,
    /// Capture time, Unix ns (the epoch header's).
    pub created_ns: u64,
    /// Size of the epoch file.
    pub bytes: u64,
    /// Its object, relative to the prefix: `epochs/ID-TAG.epoch`.
    pub object: String,
}

/// The objects of a remote store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The store's UUID (its STORE file's).
    pub store_uuid: [u8; 16],
    /// Incremented by every manifest written.
    pub generation: u64,
    /// The id of the key its epoch objects are encrypted with, if they are.
    pub key_id: Option<[u8; 16]>,
    /// Epochs by id.
    pub epochs: Vec<Entry>,
}

/// Object name of an epoch file: its id (20 digits, as locally) and a tag
/// that tells versions of the same epoch apart (a merge or a fold rewrites
/// an epoch under its id): the XXH3 of the file's 4096-byte header, which
/// holds the checksums of everything after it.
pub fn object_name(id: u64, tag: u64) -> String {
    format!("epochs/{id:020}-{tag:016x}.epoch")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 16 bytes from 32 hex digits (and nothing else).
fn unhex16(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 || !text.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Manifest {
    /// The text of this manifest.
    pub fn encode(&self) -> String {
        let mut s = format!(
            "{MAGIC}\nstore {}\ngeneration {}\n",
            hex(&self.store_uuid),
            self.generation
        );
        if let Some(k) = &self.key_id {
            s += &format!("encryption xchacha20poly1305 {}\n", hex(k));
        }
        for e in &self.epochs {
            let parent = e.parent.map_or_else(|| "-".to_string(), |p| p.to_string());
            s += &format!(
                "epoch {} parent {parent} created {} bytes {} object {}\n",
                e.id, e.created_ns, e.bytes, e.object
            );
        }
        let sum = xxhash_rust::xxh3::xxh3_64(s.as_bytes());
        s += &format!("end {sum:016x}\n");
        s
    }

    /// Parse and check a manifest.
    pub fn decode(text: &[u8]) -> Result<Manifest, ManifestError> {
        let text = std::str::from_utf8(text).map_err(|_| ManifestError::NotUtf8)?;
        let end = text
            .rfind("end ")
            .filter(|i| *i == 0 || text.as_bytes()[i - 1] == b'\n')
            .ok_or(ManifestError::NoEnd)?;
        let (body, tail) = text.split_at(end);
        let want = tail
            .strip_prefix("end ")
            .and_then(|t| t.strip_suffix('\n'))
            .filter(|t| t.len() == 16)
            .and_then(|t| u64::from_str_radix(t, 16).ok())
            .ok_or(ManifestError::BadEnd)?;
        if xxhash_rust::xxh3::xxh3_64(body.as_bytes()) != want {
            return Err(ManifestError::Checksum);
        }
        let mut lines = body.lines();
        if lines.next() != Some(MAGIC) {
            return Err(ManifestError::Magic);
        }
        let field = |line: Option<&str>, name: &'static str| -> Result<String, ManifestError> {
            line.and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .map(str::to_string)
                .ok_or(ManifestError::NoLine(name))
        };
        let store_uuid = unhex16(&field(lines.next(), "store")?).ok_or(ManifestError::StoreUuid)?;
        let generation = field(lines.next(), "generation")?
            .parse()
            .map_err(|_| ManifestError::Generation)?;
        let mut lines = lines.peekable();
        let mut key_id = None;
        if let Some(k) = lines
            .peek()
            .and_then(|l| l.strip_prefix("encryption xchacha20poly1305 "))
        {
            key_id = Some(unhex16(k).ok_or(ManifestError::KeyId)?);
            lines.next();
        }
        let mut epochs: Vec<Entry> = Vec::new();
        for (n, line) in lines.enumerate() {
            let bad = || ManifestError::EpochLine {
                number: n + 1,
                line: line.to_string(),
            };
            let w: Vec<&str> = line.split(' ').collect();
            let [
                "epoch",
                id,
                "parent",
                parent,
                "created",
                created,
                "bytes",
                bytes,
                "object",
                object,
            ] = w[..]
            else {
                return Err(bad());
            };
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
            let id = num(id)?;
            let parent = if parent == "-" { None } else { Some(num(parent)?) };
            let ok_object = object.starts_with(&format!("epochs/{id:020}-"))
                && object.ends_with(".epoch")
                && object.len() == "epochs/".len() + 20 + 1 + 16 + ".epoch".len()
                && object.bytes().all(|c| c.is_ascii_alphanumeric() || b"/-.".contains(&c));
            if !ok_object || parent.is_some_and(|p| p >= id) || epochs.last().is_some_and(|l| l.id >= id) {
                return Err(bad());
            }
            epochs.push(Entry {
                id,
                parent,
                created_ns: num(created)?,
                bytes: num(bytes)?,
                object: object.into(),
            });
        }
        Ok(Manifest {
            store_uuid,
            generation,
            key_id,
            epochs,
        })
    }

    /// The entry of epoch `id`.
    pub fn get(&self, id: u64) -> Option<&Entry> {
        self.epochs
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|i| &self.epochs[i])
    }

    /// The chain of epoch `id`, newest first, down to a full epoch; `None`
    /// if an epoch of it is missing.
    pub fn chain(&self, id: u64) -> Option<Vec<&Entry>> {
        let mut out = vec![self.get(id)?];
        while let Some(p) = out.last()?.parent {
            out.push(self.get(p)?);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            store_uuid: [7; 16],
            generation: 3,
            key_id: None,
            epochs: vec![
                Entry {
                    id: 1,
                    parent: None,
                    created_ns: 10,
                    bytes: 8192,
                    object: object_name(1, 0xabc),
                },
                Entry {
                    id: 4,
                    parent: Some(1),
                    created_ns: 20,
                    bytes: 12288,
                    object: object_name(4, u64::MAX),
                },
            ],
        }
    }

    #[test]
    fn manifests_round_trip_and_give_chains() {
        let m = sample();
        let text = m.encode();
        assert_eq!(Manifest::decode(text.as_bytes()).unwrap(), m);
        let ids: Vec<u64> = m.chain(4).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(ids, [4, 1]);
        assert!(m.chain(2).is_none());
        let empty = Manifest {
            epochs: Vec::new(),
            ..sample()
        };
        assert_eq!(Manifest::decode(empty.encode().as_bytes()).unwrap(), empty);
        let sealed = Manifest {
            key_id: Some([0xab; 16]),
            ..sample()
        };
        assert_eq!(Manifest::decode(sealed.encode().as_bytes()).unwrap(), sealed);
    }

    #[test]
    fn every_damaged_manifest_is_refused() {
        let text = sample().encode().into_bytes();
        // Every byte flipped, and every cut, is caught.
        for i in 0..text.len() {
            let mut t = text.clone();
            t[i] ^= 0x01;
            assert!(Manifest::decode(&t).is_err(), "flip at {i}");
            assert!(Manifest::decode(&text[..i]).is_err(), "cut at {i}");
        }
        // A well-formed checksum over bad content is refused too.
        let body = "consnap-remote 1\nstore 07070707070707070707070707070707\ngeneration 1\nepoch 5 parent 5 created 1 bytes 1 object epochs/00000000000000000005-0000000000000abc.epoch\n";
        let forged = format!("{body}end {:016x}\n", xxhash_rust::xxh3::xxh3_64(body.as_bytes()));
        assert_eq!(
            Manifest::decode(forged.as_bytes()).unwrap_err().to_string(),
            "epoch line 1: \"epoch 5 parent 5 created 1 bytes 1 object epochs/00000000000000000005-0000000000000abc.epoch\""
        );
    }
}
