//! The paged KV cache's bookkeeping (block ids, reference counts, prefix cache). The
//! memory itself belongs to the backend; this module only decides which block holds what.

mod block_hash;
mod block_manager;
mod free_queue;
mod lease;
mod lease_directory;

pub use block_hash::{hash_block, hash_full_blocks};
pub use block_manager::{BlockId, BlockManager};
pub use lease::{FirstTokenReply, LeaseTable};
pub use lease_directory::LeaseDirectory;
