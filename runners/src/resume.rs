//! Admitting a stored run: before any request, every runner checks that the run it loaded
//! (a state file, a DynamoDB item, a Step Functions input, a `transfer-state.json`) is bound
//! to the settings of the current configuration ([`pathling_import_core::binding`]). A run
//! whose endpoints, authentication or staging location differ is refused — its secrets would
//! otherwise be paired with settings whoever wrote the stored run chose — unless the operator
//! explicitly rebinds it.

use pathling_import_core::binding::{differences, Difference, RebindError};
use pathling_import_core::spec::RunSpec;
use pathling_import_core::SyncRun;

/// A stored run that may not be driven with the current configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("run {run_id} was started with other settings than the configuration has now ({}); it is not continued with them", keys(differences))]
    Differs {
        run_id: String,
        differences: Vec<Difference>,
    },
    #[error("run {run_id}: {source}")]
    CannotRebind {
        run_id: String,
        #[source]
        source: RebindError,
    },
}

impl Refused {
    /// The differing settings (keys and safe values), for a runner that lists them.
    pub fn differences(&self) -> &[Difference] {
        match self {
            Refused::Differs { differences, .. } => differences,
            Refused::CannotRebind { .. } => &[],
        }
    }
}

fn keys(differences: &[Difference]) -> String {
    differences
        .iter()
        .map(|d| d.key)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What admission did to the run.
#[derive(Debug)]
pub enum Admitted {
    /// Bound to the configured settings already: drive it as it is.
    AsStored(SyncRun),
    /// Rebound on request: persist it (its `seq` moved on) before driving it.
    Rebound {
        run: SyncRun,
        differences: Vec<Difference>,
    },
}

impl Admitted {
    pub fn run(&self) -> &SyncRun {
        match self {
            Admitted::AsStored(run) | Admitted::Rebound { run, .. } => run,
        }
    }
}

/// Checks `run` against the configured spec; with `rebind`, takes the configured settings
/// instead of refusing. Logs once when the run was stored by an older version.
pub fn admit(run: SyncRun, configured: &RunSpec, rebind: bool) -> Result<Admitted, Refused> {
    if let Some(version) = run.upgraded_from {
        tracing::info!(
            run_id = %run.run_id,
            from_schema = version,
            "run stored by an earlier version; upgraded, and bound to its recorded settings"
        );
    }
    let differences = differences(&run.spec, configured);
    if differences.is_empty() {
        return Ok(Admitted::AsStored(run));
    }
    if !rebind {
        return Err(Refused::Differs {
            run_id: run.run_id,
            differences,
        });
    }
    let rebound = run
        .rebind(configured)
        .map_err(|source| Refused::CannotRebind {
            run_id: run.run_id.clone(),
            source,
        })?;
    tracing::warn!(
        run_id = %rebound.run_id,
        keys = %keys(&differences),
        "run rebound to the configured settings on request"
    );
    Ok(Admitted::Rebound {
        run: rebound,
        differences,
    })
}
