//! Deterministic synthetic FHIR data for the fake Bulk Data source.
//!
//! Resource `i` of type `T` has id `"{t}-{i}"` (`t` = `T` lower-cased, e.g. `patient-7`) and
//! `meta.lastUpdated` = `base_time + i * step_seconds`, so a `_since` filter selects a suffix of
//! every type. Resources of patient-compartment types point at `Patient/patient-{i % P}` where
//! `P` is the number of Patients in the dataset (at least 1). Everything is a pure function of
//! [`DatasetConfig`] and the index, so files of any size are generated as streams and tests
//! can compute exactly what an export must contain ([`DatasetConfig::includes`]).
//!
//! `_since` is inclusive (`lastUpdated >= _since`), as HAPI implements it; the Bulk Data IG says
//! "after", and a client must cope with either, so an incremental sync that re-imports the
//! boundary resource is correct.

use std::collections::{BTreeSet, HashSet};
use std::ops::Range;

use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Utc};
use serde_json::{json, Value};

use crate::fhir::format_instant;

/// Number and layout of the resources of one type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeSpec {
    /// FHIR resource type, e.g. `Observation`.
    pub resource_type: String,
    /// Number of resources.
    pub count: u64,
    /// Number of NDJSON files they are split into (contiguous index ranges).
    pub files: u32,
}

impl TypeSpec {
    /// A type with `count` resources in `files` files.
    pub fn new(resource_type: &str, count: u64, files: u32) -> Self {
        Self {
            resource_type: resource_type.into(),
            count,
            files: files.max(1),
        }
    }
}

/// The whole synthetic dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetConfig {
    /// Types in manifest order.
    pub types: Vec<TypeSpec>,
    /// `meta.lastUpdated` of resource 0 of every type.
    pub base_time: DateTime<Utc>,
    /// Seconds between the `lastUpdated` of consecutive resources.
    pub step_seconds: i64,
    /// Extra bytes of narrative per resource, to make big files quickly.
    pub padding_bytes: usize,
}

impl Default for DatasetConfig {
    /// 3 types: 50 Patients (1 file), 120 Observations (2 files), 60 Conditions (1 file).
    fn default() -> Self {
        Self::new(&[
            ("Patient", 50, 1),
            ("Observation", 120, 2),
            ("Condition", 60, 1),
        ])
    }
}

/// Types that are not in the Patient compartment: Patient- and Group-level exports leave them
/// out, as real servers do.
pub const NON_COMPARTMENT_TYPES: &[&str] = &[
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Location",
    "Medication",
    "Device",
    "Group",
];

/// Whether resources of the type belong to a patient.
pub fn is_patient_compartment(resource_type: &str) -> bool {
    !NON_COMPARTMENT_TYPES.contains(&resource_type)
}

/// Which part of the dataset an export selects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExportFilter {
    /// `_type`; `None` = every type of the dataset.
    pub types: Option<Vec<String>>,
    /// `_since` (inclusive).
    pub since: Option<DateTime<Utc>>,
    /// Patient ids (`patient` parameter or Group members); `None` = all patients.
    pub patients: Option<BTreeSet<String>>,
    /// Patient- or Group-level export: only patient-compartment types.
    pub compartment_only: bool,
}

/// Parses the index out of an id of this dataset (`observation-12` → 12).
pub fn index_of_id(resource_type: &str, id: &str) -> Option<u64> {
    let prefix = resource_type.to_ascii_lowercase();
    id.strip_prefix(&prefix)?.strip_prefix('-')?.parse().ok()
}

/// The id of resource `i` of a type.
pub fn id_of(resource_type: &str, i: u64) -> String {
    format!("{}-{}", resource_type.to_ascii_lowercase(), i)
}

impl DatasetConfig {
    /// A dataset from `(type, count, files)` triples, based at 2024-01-01T00:00:00Z, one
    /// minute apart, no padding.
    pub fn new(types: &[(&str, u64, u32)]) -> Self {
        Self {
            types: types
                .iter()
                .map(|(t, c, f)| TypeSpec::new(t, *c, *f))
                .collect(),
            base_time: Utc
                .with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
                .single()
                .unwrap_or_else(Utc::now),
            step_seconds: 60,
            padding_bytes: 0,
        }
    }

    /// The spec of a type, if the dataset has it.
    pub fn spec(&self, resource_type: &str) -> Option<&TypeSpec> {
        self.types.iter().find(|t| t.resource_type == resource_type)
    }

    /// Number of Patients that other resources refer to (at least 1).
    pub fn patient_count(&self) -> u64 {
        self.spec("Patient").map(|s| s.count).unwrap_or(1).max(1)
    }

    /// `meta.lastUpdated` of resource `i`.
    pub fn last_updated(&self, i: u64) -> DateTime<Utc> {
        let offset = i64::try_from(i)
            .unwrap_or(i64::MAX)
            .saturating_mul(self.step_seconds);
        ChronoDuration::try_seconds(offset)
            .and_then(|d| self.base_time.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// The patient id resource `i` of a type belongs to.
    pub fn patient_of(&self, resource_type: &str, i: u64) -> String {
        if resource_type == "Patient" {
            id_of("Patient", i)
        } else {
            id_of("Patient", i % self.patient_count())
        }
    }

    /// Index range of file `k` of a type.
    pub fn file_range(&self, spec: &TypeSpec, k: u32) -> Range<u64> {
        let files = u64::from(spec.files.max(1));
        let k = u64::from(k);
        (k * spec.count / files)..((k + 1) * spec.count / files)
    }

    /// The dataset types an export with this filter covers, in dataset order.
    pub fn selected_types(&self, filter: &ExportFilter) -> Vec<&TypeSpec> {
        self.types
            .iter()
            .filter(|t| {
                filter
                    .types
                    .as_ref()
                    .is_none_or(|ts| ts.contains(&t.resource_type))
            })
            .filter(|t| !filter.compartment_only || is_patient_compartment(&t.resource_type))
            .collect()
    }

    /// Whether resource `i` of a type is part of the export (type selection aside).
    pub fn includes(
        &self,
        filter: &ExportFilter,
        deleted: &HashSet<(String, String)>,
        resource_type: &str,
        i: u64,
    ) -> bool {
        if filter
            .since
            .is_some_and(|since| self.last_updated(i) < since)
        {
            return false;
        }
        if let Some(patients) = &filter.patients {
            if !patients.contains(&self.patient_of(resource_type, i)) {
                return false;
            }
        }
        if !deleted.is_empty()
            && deleted.contains(&(resource_type.to_string(), id_of(resource_type, i)))
        {
            return false;
        }
        true
    }

    /// The resource `i` of a type.
    pub fn resource(&self, resource_type: &str, i: u64) -> Value {
        let id = id_of(resource_type, i);
        let meta = json!({"lastUpdated": format_instant(self.last_updated(i))});
        let subject =
            json!({"reference": format!("Patient/{}", self.patient_of(resource_type, i))});
        const GENDERS: [&str; 4] = ["male", "female", "other", "unknown"];
        let mut r = match resource_type {
            "Patient" => json!({
                "resourceType": "Patient",
                "id": id,
                "meta": meta,
                "active": true,
                "gender": GENDERS[(i % 4) as usize],
                "birthDate": format!("{}-{:02}-{:02}", 1940 + i % 70, 1 + i % 12, 1 + i % 28),
                "name": [{"family": format!("Family{i}"), "given": [format!("Given{i}")]}],
            }),
            "Observation" => json!({
                "resourceType": "Observation",
                "id": id,
                "meta": meta,
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4",
                                     "display": "Heart rate"}]},
                "subject": subject,
                "effectiveDateTime": format_instant(self.last_updated(i)),
                "valueQuantity": {"value": 50 + i % 70, "unit": "beats/minute",
                                  "system": "http://unitsofmeasure.org", "code": "/min"},
            }),
            "Condition" => json!({
                "resourceType": "Condition",
                "id": id,
                "meta": meta,
                "clinicalStatus": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003",
                                     "display": "Hypertensive disorder"}]},
                "subject": subject,
            }),
            "Encounter" => json!({
                "resourceType": "Encounter",
                "id": id,
                "meta": meta,
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                          "code": "AMB"},
                "subject": subject,
            }),
            other if is_patient_compartment(other) => json!({
                "resourceType": other, "id": id, "meta": meta, "subject": subject,
            }),
            other => json!({"resourceType": other, "id": id, "meta": meta}),
        };
        if self.padding_bytes > 0 {
            if let Some(obj) = r.as_object_mut() {
                let div = format!(
                    "<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>",
                    "x".repeat(self.padding_bytes)
                );
                obj.insert("text".into(), json!({"status": "generated", "div": div}));
            }
        }
        r
    }

    /// Appends resource `i` as one line of JSON (no newline).
    pub fn write_resource(&self, resource_type: &str, i: u64, out: &mut Vec<u8>) {
        // Serializing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(out, &self.resource(resource_type, i));
    }

    /// Number of resources of file `k` of a type that the export includes.
    pub fn count_in_file(
        &self,
        filter: &ExportFilter,
        deleted: &HashSet<(String, String)>,
        spec: &TypeSpec,
        k: u32,
    ) -> u64 {
        let range = self.file_range(spec, k);
        if filter.since.is_none() && filter.patients.is_none() && deleted.is_empty() {
            return range.end - range.start;
        }
        range
            .filter(|i| self.includes(filter, deleted, &spec.resource_type, *i))
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_partition_the_indices() {
        let d = DatasetConfig::new(&[("Observation", 10, 3)]);
        let spec = &d.types[0];
        let ranges: Vec<_> = (0..3).map(|k| d.file_range(spec, k)).collect();
        assert_eq!(ranges, vec![0..3, 3..6, 6..10]);
    }

    #[test]
    fn since_is_inclusive_and_ids_round_trip() {
        let d = DatasetConfig::default();
        let f = ExportFilter {
            since: Some(d.last_updated(5)),
            ..Default::default()
        };
        let none = HashSet::new();
        assert!(!d.includes(&f, &none, "Patient", 4));
        assert!(d.includes(&f, &none, "Patient", 5));
        assert_eq!(index_of_id("Patient", &id_of("Patient", 42)), Some(42));
        assert_eq!(
            d.resource("Observation", 51)["subject"]["reference"],
            "Patient/patient-1"
        );
    }
}
