//! The record framing of the STATE section (docs/FORMAT.md, "Machine
//! state records"): writing tagged records, padded to 8 bytes, and reading
//! fields out of one record's payload.

use super::StateError;

/// The encoded records so far.
pub(super) struct Enc(pub(super) Vec<u8>);

impl Enc {
    /// Append record `tag` (`index`: the vCPU or slot) with `payload`.
    pub(super) fn rec(&mut self, tag: u16, index: u16, payload: &[u8]) {
        self.0.extend_from_slice(&tag.to_le_bytes());
        self.0.extend_from_slice(&index.to_le_bytes());
        self.0.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.0.extend_from_slice(payload);
        while !self.0.len().is_multiple_of(8) {
            self.0.push(0);
        }
    }
}

/// Fields read in order from one record's payload (`what` names the
/// record in messages).
pub(super) struct Reader<'a> {
    pub(super) b: &'a [u8],
    pub(super) what: &'static str,
}

impl<'a> Reader<'a> {
    /// The next `n` bytes.
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.b.len() < n {
            return Err(StateError::Corrupt(format!("{} record is truncated", self.what)));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    /// The next little-endian u32.
    pub(super) fn u32(&mut self) -> Result<u32, StateError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// The next little-endian u64.
    pub(super) fn u64(&mut self) -> Result<u64, StateError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A length-prefixed UTF-8 string (`u32::MAX`: none).
    pub(super) fn string(&mut self) -> Result<Option<String>, StateError> {
        let n = self.u32()?;
        if n == u32::MAX {
            return Ok(None);
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| StateError::Corrupt(format!("{} record holds invalid UTF-8", self.what)))
    }
}
