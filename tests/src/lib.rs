//! Faithful fake servers for pathling-import's tests and sandbox.
//!
//! - [`fake_source`]: a FHIR Bulk Data Access server (kick-off at three levels, status polling
//!   with every `Retry-After` form, 429 and transient 5xx, manifests with `deleted[]` and
//!   `error[]`, chunked gzip downloads, redirects to a second "object storage" origin with
//!   pre-signed URLs, injected connection resets) with SMART Backend Services auth.
//! - [`fake_pathling`]: a Pathling server speaking both `$import` generations (7.x `source`,
//!   9.2+ `input`/`saveMode`), reading staged NDJSON from `file://` or S3, with async jobs, the
//!   one-import-at-a-time rule, and 9.x deletes.
//! - [`auth`] and [`keys`]: the SMART token machinery both fakes share, and test keys to sign
//!   `private_key_jwt` assertions.
//! - [`data`]: the deterministic synthetic dataset and the filters to compute expected
//!   results.
//!
//! The behaviour follows `docs/protocols.md` (§1 "SMART Backend Services", §2 "FHIR Bulk
//! Data export", §3 "Pathling `$import`"); each module documents its contract and knobs.
//! Servers bind `127.0.0.1:0` (plain http, or https with a given certificate:
//! [`server::TlsIdentity`]), are configured through plain structs whose fields can be
//! changed while they run, and stop when their handle is dropped.

pub mod auth;
pub mod data;
pub mod fake_pathling;
pub mod fake_source;
pub mod fhir;
pub mod keys;
pub mod server;
