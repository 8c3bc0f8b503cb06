//! The README's configuration table must name every key the core understands, in both
//! spellings, so the documentation cannot silently fall behind the parser.

use pathling_import_core::config::{camel_case, KEYS};

#[test]
fn readme_documents_every_configuration_key() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let missing: Vec<String> = KEYS
        .iter()
        .flat_map(|(key, ..)| [format!("`{key}`"), format!("`{}`", camel_case(key))])
        .filter(|k| !readme.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not document {missing:?}"
    );
}
