//! `docs/ARCHITECTURE.md` stays true: every file or folder it names in backticks exists, so a
//! move or rename that forgets the page fails here.

use std::path::Path;

#[test]
fn every_path_the_architecture_page_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let paths: Vec<&str> = page
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            !s.contains(' ')
                && !s.contains('<')
                && (s.ends_with('/')
                    || [".rs", ".md", ".py", ".json"]
                        .iter()
                        .any(|e| s.ends_with(e)))
                && s.contains('/')
        })
        .collect();
    assert!(paths.len() >= 20, "too few paths found: {paths:?}");
    let missing: Vec<&&str> = paths.iter().filter(|p| !root.join(p).exists()).collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md names missing paths: {missing:?}"
    );
}
