//! placeholder
pub mod auth;
pub mod driver;
pub mod executor;
pub mod file_store;
pub mod http;
pub mod report;
pub mod staging;
