//! Epochs of a remote store read in place, by ranged GETs: a lazy restore
//! on a host without a local copy opens the chain's headers, indexes and
//! page checksums, and fetches page data only as the guest (or the
//! background fill) needs it.
//!
//! Objects are read in blocks of 1 MiB, the chunks an encrypted object is
//! sealed in, so that every block fetched is authenticated on its own. A
//! read fetches the blocks it spans that it does not find in a small cache
//! in one request; the blocks at either end of a read, which it uses only
//! part of, are kept for the reads next to it (faults nearby, the fill's
//! next read).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use store::format::HEADER_SIZE;
use store::{EpochReader, RangeRead};

use crate::client::Client;
use crate::error::{RemoteError, Result};
use crate::fetch::{check_key, tag_of};
use crate::manifest::{Entry, Manifest};
use crate::seal::{self, SealError};

/// Bytes per block: the plaintext of one sealed chunk.
const BLOCK: u64 = seal::CHUNK as u64;
/// Blocks each object keeps.
const CACHED_BLOCKS: usize = 8;
/// Epochs of a chain opened at once.
const PARALLEL_OPENS: usize = 8;

/// Requests and bytes of ranged reads, shared by the objects of a chain.
#[derive(Debug, Default)]
pub struct RangeStats {
    /// GET requests made.
    pub gets: AtomicU64,
    /// Bytes they brought (as stored: sealed chunks with their tags).
    pub bytes: AtomicU64,
}

/// One epoch object, read by ranges.
struct ObjectReader {
    client: Arc<Client>,
    name: String,
    /// Plaintext length (the epoch file's).
    len: u64,
    /// The sealed head, when the object is encrypted.
    head: Option<Vec<u8>>,
    cache: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    stats: Arc<RangeStats>,
}

impl ObjectReader {
    /// Open `e`'s object: its first block (and head, when encrypted) in
    /// one request, checked against the manifest's length and the tag in
    /// the object's name.
    fn open(client: Arc<Client>, e: &Entry, stats: Arc<RangeStats>) -> Result<ObjectReader> {
        let bad = |why: String| RemoteError::BadObject {
            url: client.url().to_string(),
            key: client.url().key(&e.object),
            why,
        };
        let unsealed = |source: SealError| RemoteError::SealedObject {
            url: client.url().to_string(),
            key: client.url().key(&e.object),
            source,
        };
        let sealed = client.key().is_some();
        let first_end = if sealed {
            seal::chunk_range(e.bytes, 0).end
        } else {
            BLOCK.min(e.bytes)
        };
        let mut bytes = client.get_range(&e.object, 0..first_end)?;
        stats.gets.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let head = match client.key() {
            Some(k) if bytes.len() >= seal::HEAD => {
                let head = bytes[..seal::HEAD].to_vec();
                if k.open_head(&head).map_err(unsealed)? != e.bytes {
                    return Err(bad("its length is not the manifest's".into()));
                }
                bytes.drain(..seal::HEAD);
                Some(head)
            }
            Some(_) => return Err(bad("cut short".into())),
            None => None,
        };
        let r = ObjectReader {
            client: client.clone(),
            name: e.object.clone(),
            len: e.bytes,
            head,
            cache: Mutex::new(VecDeque::new()),
            stats,
        };
        let block0 = r.open_blocks(0, bytes).map_err(unsealed)?;
        let b0 = &block0[0];
        if b0.len() < HEADER_SIZE.min(e.bytes as usize) {
            return Err(bad("cut short".into()));
        }
        if Some(xxhash_rust::xxh3::xxh3_64(&b0[..HEADER_SIZE.min(b0.len())])) != tag_of(&e.object) {
            return Err(bad("its header does not match its name".into()));
        }
        r.keep(0, block0[0].clone());
        Ok(r)
    }

    /// Stored byte range of blocks `[first, last]`.
    fn stored_range(&self, first: u64, last: u64) -> std::ops::Range<u64> {
        if self.head.is_some() {
            seal::chunk_range(self.len, first).start..seal::chunk_range(self.len, last).end
        } else {
            first * BLOCK..((last + 1) * BLOCK).min(self.len)
        }
    }

    /// Split `stored` (blocks from `first` on, as stored) into plaintext
    /// blocks, authenticating each when encrypted.
    fn open_blocks(&self, first: u64, mut stored: Vec<u8>) -> std::result::Result<Vec<Arc<Vec<u8>>>, SealError> {
        match (&self.head, self.client.key()) {
            (Some(head), Some(k)) => Ok(k
                .open_chunks(head, &self.name, self.len, first, &mut stored)?
                .into_iter()
                .map(|(_, plain)| Arc::new(stored[plain].to_vec()))
                .collect()),
            _ if stored.len() as u64 <= BLOCK => Ok(vec![Arc::new(stored)]),
            _ => Ok(stored.chunks(BLOCK as usize).map(|c| Arc::new(c.to_vec())).collect()),
        }
    }

    fn cached(&self, block: u64) -> Option<Arc<Vec<u8>>> {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.iter().find(|(b, _)| *b == block).map(|(_, d)| d.clone())
    }

    fn keep(&self, block: u64, data: Arc<Vec<u8>>) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.iter().any(|(b, _)| *b == block) {
            return;
        }
        if c.len() == CACHED_BLOCKS {
            c.pop_front();
        }
        c.push_back((block, data));
    }

    /// Fetch blocks `[first, last]` in one request.
    fn fetch(&self, first: u64, last: u64) -> std::io::Result<Vec<Arc<Vec<u8>>>> {
        let range = self.stored_range(first, last);
        let want = range.end - range.start;
        let bytes = self
            .client
            .get_range(&self.name, range)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if bytes.len() as u64 != want {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("asked for {want} bytes of {}, got {}", self.name, bytes.len()),
            ));
        }
        self.open_blocks(first, bytes).map_err(std::io::Error::other)
    }
}

impl RangeRead for ObjectReader {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = at
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("bytes {at}.. are past the end of {} ({} bytes)", self.name, self.len),
                )
            })?;
        let (first, last) = (at / BLOCK, (end - 1) / BLOCK);
        let mut block = first;
        while block <= last {
            let blocks = match self.cached(block) {
                Some(d) => vec![d],
                None => {
                    // The run of blocks missing from here on, in one request.
                    let mut to = block;
                    while to < last && self.cached(to + 1).is_none() {
                        to += 1;
                    }
                    self.fetch(block, to)?
                }
            };
            for d in blocks {
                let start = block * BLOCK;
                let from = at.max(start);
                let to = end.min(start + d.len() as u64);
                if to <= from {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("block {block} of {} is cut short", self.name),
                    ));
                }
                buf[(from - at) as usize..(to - at) as usize]
                    .copy_from_slice(&d[(from - start) as usize..(to - start) as usize]);
                // A block used in part: its other part is likely next.
                if from > start || to < start + d.len() as u64 {
                    self.keep(block, d);
                }
                block += 1;
            }
        }
        Ok(())
    }
}

/// What [`open_chain`] opened.
pub struct RemoteChain {
    /// The chain, epoch `id` first, each read by ranges.
    pub chain: Vec<EpochReader>,
    /// Requests and bytes so far (the objects keep counting as they are read).
    pub stats: Arc<RangeStats>,
    /// Seconds it took to open.
    pub seconds: f64,
}

/// Open the chain of epoch `id` of the remote store in place: every epoch
/// read by ranged GETs, its header, index, page checksums and frame table
/// verified as a local open verifies them, and the chain checked to be
/// one machine's. Epochs are opened in parallel.
pub fn open_chain(client: &Arc<Client>, m: &Manifest, id: u64) -> Result<RemoteChain> {
    let t0 = Instant::now();
    check_key(client, m)?;
    let url = client.url().to_string();
    let entries = m.chain(id).ok_or_else(|| RemoteError::BadManifest {
        url: url.clone(),
        why: format!("epoch {id} has no whole chain in it"),
    })?;
    let stats = Arc::new(RangeStats::default());
    let mut chain = Vec::with_capacity(entries.len());
    for group in entries.chunks(PARALLEL_OPENS) {
        let opened: Vec<Result<EpochReader>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|e| {
                    let (client, stats) = (client.clone(), stats.clone());
                    s.spawn(move || open_epoch(client, e, m, stats))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(RemoteError::Setup {
                            url: url.clone(),
                            why: "a thread opening an epoch panicked".into(),
                        })
                    })
                })
                .collect()
        });
        for r in opened {
            chain.push(r?);
        }
    }
    for pair in chain.windows(2) {
        let (h, p) = (pair[0].header(), pair[1].header());
        let why = if Some(p.id) != (!h.is_full()).then_some(h.parent) {
            Some(format!(
                "epoch {} follows epoch {}, not its parent {}",
                h.id, p.id, h.parent
            ))
        } else {
            h.parent_mismatch(p)
        };
        if let Some(why) = why {
            return Err(RemoteError::BadManifest { url, why });
        }
    }
    Ok(RemoteChain {
        chain,
        stats,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn open_epoch(client: Arc<Client>, e: &Entry, m: &Manifest, stats: Arc<RangeStats>) -> Result<EpochReader> {
    let name = format!("{}/{}", client.url(), e.object);
    let bad = |why: String| RemoteError::BadObject {
        url: client.url().to_string(),
        key: client.url().key(&e.object),
        why,
    };
    let src = ObjectReader::open(client.clone(), e, stats)?;
    let r = EpochReader::open_ranged(Path::new(&name), Arc::new(src), e.bytes).map_err(Box::new)?;
    let h = r.header();
    if h.id != e.id || h.store_uuid != m.store_uuid || (!h.is_full()).then_some(h.parent) != e.parent {
        return Err(bad(format!(
            "its header (epoch {}, parent {}) is not the manifest's epoch {} of store {}",
            h.id,
            h.parent,
            e.id,
            m.store_uuid.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )));
    }
    Ok(r)
}
