//! placeholder
pub mod auth;
pub mod staging;
