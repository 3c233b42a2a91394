//! What `deploy/` ships, checked against what it claims (issue 16 items 4 and 5): the
//! systemd unit's `Documentation=` names a file the documented install puts there.

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every `Documentation=` URI is real: a `file:` URI is one the install instructions
/// (the unit's header and README) put in place, from a file of this repository; a `man:`
/// page is one systemd ships. No placeholder host.
#[test]
fn unit_documentation_points_at_something_installed() {
    let unit = std::fs::read_to_string(Path::new(ROOT).join("deploy/connector.service")).unwrap();
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let uris: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(!uris.is_empty(), "the unit has no Documentation=");
    for uri in uris {
        if let Some(path) = uri.strip_prefix("file://") {
            // `install -D -m 0644 SRC DEST`: in the unit's header and in README alike.
            for (name, text) in [("the unit's header", &unit), ("README.md", &readme)] {
                let line = text
                    .lines()
                    .find(|l| l.contains("install ") && l.contains(&format!(" {path}")))
                    .unwrap_or_else(|| panic!("{name} does not install {path} ({uri})"));
                let words: Vec<&str> = line
                    .trim_start_matches(['#', ' '])
                    .split_whitespace()
                    .collect();
                let at = words.iter().position(|w| *w == path).unwrap();
                let source = words[at - 1];
                assert!(
                    Path::new(ROOT).join(source).is_file(),
                    "{name} installs {path} from {source}, which is not in the repository"
                );
            }
        } else if let Some(page) = uri.strip_prefix("man:") {
            assert!(
                page.starts_with("systemd."),
                "{uri}: not a page systemd ships"
            );
        } else {
            panic!("{uri}: not a file: or man: URI of the installed layout");
        }
        assert!(!uri.contains("example.invalid"), "{uri} is a placeholder");
    }
}
