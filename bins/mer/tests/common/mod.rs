//! Helpers shared by the integration tests of this crate.

pub mod mock_llm;
pub mod shared;
