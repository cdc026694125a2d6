//! consnap's snapshot store.
//!
//! A store is a directory of epoch files. Each epoch holds the encoded
//! machine state and a set of guest pages with an explicit index (data or
//! zero extents, never holes) and a checksum per page. A full epoch records
//! every page; an incremental one records the pages dirtied since its
//! parent, so restoring epoch N reads N, its parent, and so on down to a
//! full epoch. The layout is specified in docs/FORMAT.md.

mod aligned;
mod background;
pub mod civil;
mod codec;
mod cursor;
mod durable;
mod error;
mod fold;
pub mod format;
pub mod fuzzing;
mod ledger;
mod plan;
mod reader;
mod reclaim;
pub mod retain;
mod ship;
mod store;
mod sums;
mod verify;
mod writer;

pub use aligned::AlignedBuf;
pub use codec::{Codec, CodecError, Decompressor};
pub use cursor::PageCursor;
pub use error::{Result, StoreError};
pub use format::{Extent, ExtentKind, Header, Mode, PAGE, VERSION};
pub use ledger::{LEDGER_FILE, Ledger};
pub use plan::{Run, Source, claims, plan};
pub use reader::{EpochReader, RangeRead};
pub use reclaim::{DEFAULT_MAX_CHAIN, Headroom, ReclaimOptions, Usage, reclaim, usage, usage_since};
pub use retain::{DEFAULT_POLICY, Policy, PolicyError};
pub use ship::{Detached, merged_onto};
pub use store::{Access, Store, Stray, epoch_file_name, epoch_id_of};
pub use verify::{Depth, Health, Problem, Verdict, Verified, assess, assess_epoch, verify};
pub use writer::{EpochInfo, EpochMeta, EpochWriter};

/// Now, in ns since the Unix epoch: the clock of epochs' capture times
/// (`Header::created_ns`); 0 on a clock set before 1970.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
