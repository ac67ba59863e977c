//! Mass production: per-device images with a ledger of issued ids ([`generate`]), flashing them
//! one device per chip with claims and a production log ([`flash`]), the ledger itself
//! ([`ledger`]: the trait and SQLite; [`postgres`]: a server shared by stations on several PCs),
//! which ledger belongs to a product ([`product`]), the CSV inputs ([`input`]), and a flashing
//! station that loops over boards ([`station`]).

mod chip_values;
pub mod flash;
pub mod generate;
pub mod input;
pub mod ledger;
pub mod migrate;
pub mod postgres;
pub mod product;
pub mod station;
mod stored;

pub use self::product::{ChosenLedger, product_ledger};
