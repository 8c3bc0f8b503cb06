//! placeholder
pub mod auth;
pub mod staging;
pub mod driver;
pub mod executor;
pub mod file_store;
pub mod http;
pub mod report;
