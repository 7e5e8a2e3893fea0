//! The rules of DESIGN §4, one function each.
//!
//! Every function takes the factory, creates its own [`Fixture`](crate::Fixture)
//! (fresh transport, random namespace) through
//! [`with_fixture`](crate::fixture::with_fixture), and returns
//! [`Outcome::Passed`](crate::Outcome::Passed), [`Outcome::Skipped`](crate::Outcome::Skipped)
//! with the missing capability, or a [`Failure`](crate::Failure) saying what was
//! expected. [`all_rules`](crate::all_rules) lists them in this order.

mod dead_letters;
mod delivery;
mod input;
mod order;
mod request;
mod settle;
mod storage;
mod time;

pub use dead_letters::*;
pub use delivery::*;
pub use input::*;
pub use order::*;
pub use request::*;
pub use settle::*;
pub use storage::*;
pub use time::*;
