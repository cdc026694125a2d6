//! Compression of page data: each frame of up to 16 consecutive DATA pages
//! is compressed on its own (zstd or LZ4 block format), or stored as it is
//! when compression would not make it smaller.

use std::fmt;

use thiserror::Error;

/// How DATA is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// Pages as they are, 4096 bytes each.
    #[default]
    None,
    /// Zstandard frames (level [`ZSTD_LEVEL`]).
    Zstd,
    /// LZ4 blocks.
    Lz4,
}

/// Why a compression name is refused or page data does not decompress.
#[derive(Debug, Error)]
pub enum CodecError {
    /// A name on the command line that is no compression.
    #[error("'{0}' is not a compression (known: none, zstd, lz4)")]
    Unknown(String),
    /// Pages stored as they are were given to the decompressor.
    #[error("not compressed")]
    NotCompressed,
    /// zstd refused the frame (or could not make a context).
    #[error("{0}")]
    Zstd(#[source] std::io::Error),
    /// LZ4 refused the block.
    #[error("{0}")]
    Lz4(#[from] lz4_flex::block::DecompressError),
    /// The frame holds fewer or more bytes than its pages.
    #[error("decompresses to {got} bytes, not {want}")]
    Length {
        /// Bytes it decompressed to.
        got: usize,
        /// Bytes its pages take.
        want: usize,
    },
}

/// The zstd level consnap writes: the fastest standard level, so that
/// compressing keeps up with the capture (see docs/FORMAT.md).
pub const ZSTD_LEVEL: i32 = 1;

impl Codec {
    /// Code in the header.
    pub fn code(self) -> u32 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
            Codec::Lz4 => 2,
        }
    }

    /// From a header code.
    pub fn from_code(c: u32) -> Option<Codec> {
        match c {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            2 => Some(Codec::Lz4),
            _ => None,
        }
    }

    /// Name on the command line and in listings.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Zstd => "zstd",
            Codec::Lz4 => "lz4",
        }
    }

    /// From a name on the command line.
    pub fn parse(s: &str) -> Result<Codec, CodecError> {
        match s {
            "none" => Ok(Codec::None),
            "zstd" => Ok(Codec::Zstd),
            "lz4" => Ok(Codec::Lz4),
            _ => Err(CodecError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A reusable compression context.
pub(crate) struct Compressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor").field("codec", &self.codec).finish()
    }
}

impl Compressor {
    pub(crate) fn new(codec: Codec) -> Compressor {
        let zstd = match codec {
            Codec::Zstd => zstd::bulk::Compressor::new(ZSTD_LEVEL).ok(),
            _ => None,
        };
        Compressor { codec, zstd }
    }

    /// Compress `src` into `dst` (cleared first). Returns false when the
    /// result would not be smaller than `src`: the frame is then stored raw.
    pub(crate) fn compress(&mut self, src: &[u8], dst: &mut Vec<u8>) -> bool {
        dst.clear();
        let ok = match (self.codec, &mut self.zstd) {
            (Codec::Zstd, Some(z)) => {
                dst.reserve(zstd::zstd_safe::compress_bound(src.len()));
                z.compress_to_buffer(src, dst).is_ok()
            }
            (Codec::Lz4, _) => {
                dst.resize(lz4_flex::block::get_maximum_output_size(src.len()), 0);
                match lz4_flex::block::compress_into(src, dst) {
                    Ok(n) => {
                        dst.truncate(n);
                        true
                    }
                    Err(_) => false,
                }
            }
            _ => false,
        };
        ok && dst.len() < src.len()
    }
}

/// A reusable decompression context.
#[derive(Default)]
pub struct Decompressor {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    /// Decompress `src` into exactly `dst.len()` bytes.
    pub fn decompress(&mut self, codec: Codec, src: &[u8], dst: &mut [u8]) -> Result<(), CodecError> {
        let n = match codec {
            Codec::None => return Err(CodecError::NotCompressed),
            Codec::Zstd => {
                let z = match self.zstd.take() {
                    Some(z) => z,
                    None => zstd::bulk::Decompressor::new().map_err(CodecError::Zstd)?,
                };
                self.zstd
                    .insert(z)
                    .decompress_to_buffer(src, dst)
                    .map_err(CodecError::Zstd)?
            }
            Codec::Lz4 => lz4_flex::block::decompress_into(src, dst)?,
        };
        if n != dst.len() {
            return Err(CodecError::Length {
                got: n,
                want: dst.len(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_round_trip_and_refuse_damage() {
        let mut page = vec![0u8; 4 * 4096];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for codec in [Codec::Zstd, Codec::Lz4] {
            let mut c = Compressor::new(codec);
            let mut out = Vec::new();
            assert!(c.compress(&page, &mut out), "{codec}");
            let mut back = vec![0u8; page.len()];
            let mut d = Decompressor::default();
            d.decompress(codec, &out, &mut back).unwrap();
            assert_eq!(back, page);
            let mut short = vec![0u8; page.len() - 1];
            assert!(d.decompress(codec, &out, &mut short).is_err());
            assert!(d.decompress(codec, &out[..out.len() / 2], &mut back).is_err());
            assert_eq!(Codec::parse(codec.name()).ok(), Some(codec));
        }
        // Random bytes do not compress: stored raw.
        let mut x = 1u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!Compressor::new(Codec::Lz4).compress(&noise, &mut Vec::new()));
        let e = Codec::parse("gzip").unwrap_err();
        assert_eq!(e.to_string(), "'gzip' is not a compression (known: none, zstd, lz4)");
    }
}
