//! The paged KV cache's bookkeeping: which physical blocks each sequence holds.
//!
//! The tensors themselves (one K and one V pool per layer, `[num_blocks, block_size,
//! num_kv_heads, head_dim]`) live with the model in `model::kv`; this module only hands out block
//! indices, so the scheduler can be tested without a model. `budget` decides how many bytes the
//! pools get.

mod block_manager;
mod block_table;
mod budget;

pub use block_manager::{AllocStatus, BlockManager};
pub use block_table::{BlockId, BlockTable};
pub use budget::{activation_reserve, gpu_memory, graph_reserve, GpuMemory, KvBudget, FIXED_RESERVE};
