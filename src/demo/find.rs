//! Where the demo finds an Xray core, without help (issue 16 item 2). In order:
//!
//! 1. `CONNECTOR_XRAY_PYTHON` (a python with the wheel's `xray` module) or
//!    `CONNECTOR_XRAY_BIN` (an `xray` executable): an explicit choice, not second-guessed
//!    — when it does not work the demo says why and runs without the core. A relative
//!    path is resolved against the directory the demo was started in (the demo works in
//!    a directory of its own, where a relative path would name nothing).
//! 2. The checkout's venv, `target/peers/venv` (`scripts/install-peers.sh` makes it): of
//!    the checkout the binary runs from (`target/<profile>/connector`), and of the one it
//!    was built from (`CARGO_MANIFEST_DIR` at build time), which is what `cargo run`
//!    needs. `CONNECTOR_DEMO_CHECKOUT=DIR` names the checkout instead (the tests point it
//!    at an empty directory to stand for a machine without one).
//! 3. The cached venv, `$XDG_CACHE_HOME/connector/xray-core-<pin>/venv` (`~/.cache/…`
//!    without XDG_CACHE_HOME), which step 6 makes.
//! 4. `xray` on PATH, started as `xray run -c FILE` — how operators install Xray.
//! 5. `python3` on PATH, when it has the `xray` module.
//! 6. Unless `--no-fetch`: when `python3` has `venv` and `ensurepip`, it makes the cached
//!    venv and `pip install`s the pinned wheel into it, printing each command it runs.
//!
//! Reads: the environment above, the current directory, the executable's path, the
//! file system at those places. Writes: only the cached venv (step 6) and `fetch.log`
//! beside it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::sim::core::{Flavor, Peer, Runner, XRAY_WHEEL, wheel_version};

/// Where `scripts/install-peers.sh` puts the Xray wheel's python, in a checkout.
pub(crate) const REPO_VENV: &str = "target/peers/venv/bin/python";

/// What the search reads, gathered once ([`Lookup::from_process`]) so that the order is
/// testable on its own.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lookup {
    /// The directory the demo was started in.
    pub cwd: PathBuf,
    pub xray_python: Option<OsString>,
    pub xray_bin: Option<OsString>,
    /// Checkouts whose `target/peers/venv` may hold the core.
    pub checkouts: Vec<PathBuf>,
    /// The cached venv's directory (None: no HOME nor XDG_CACHE_HOME).
    pub cache_venv: Option<PathBuf>,
    pub path: Option<OsString>,
    pub no_fetch: bool,
}

/// One place to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Candidate {
    /// A python that should have the `xray` module.
    Python { path: PathBuf, from: String },
    /// An `xray` executable.
    Bin { path: PathBuf, from: String },
    /// Make `venv` with `python3` and install the pinned wheel into it.
    Fetch { python3: PathBuf, venv: PathBuf },
}

impl Lookup {
    pub(crate) fn from_process(no_fetch: bool) -> Lookup {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let cwd = std::env::current_dir().unwrap_or_default();
        let checkouts = match var("CONNECTOR_DEMO_CHECKOUT") {
            Some(dir) => vec![cwd.join(dir)],
            None => {
                // `<checkout>/target/<profile>/connector`: three levels up.
                let from_exe = std::env::current_exe()
                    .ok()
                    .and_then(|e| e.ancestors().nth(3).map(Path::to_path_buf));
                let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
                from_exe.into_iter().chain([built]).collect()
            }
        };
        let cache = var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")));
        Lookup {
            cwd,
            xray_python: var("CONNECTOR_XRAY_PYTHON"),
            xray_bin: var("CONNECTOR_XRAY_BIN"),
            checkouts,
            cache_venv: cache.map(|c| cache_venv(&c)),
            path: var("PATH"),
            no_fetch,
        }
    }

    /// The places to try, in order ([module docs](self)).
    pub(crate) fn candidates(&self) -> Vec<Candidate> {
        if let Some(p) = &self.xray_python {
            return vec![Candidate::Python {
                path: self.resolve(p),
                from: "CONNECTOR_XRAY_PYTHON".into(),
            }];
        }
        if let Some(p) = &self.xray_bin {
            return vec![Candidate::Bin {
                path: self.resolve(p),
                from: "CONNECTOR_XRAY_BIN".into(),
            }];
        }
        let mut out: Vec<Candidate> = Vec::new();
        for checkout in &self.checkouts {
            let c = Candidate::Python {
                path: checkout.join(REPO_VENV),
                from: format!("the checkout's venv ({})", checkout.display()),
            };
            if !out.iter().any(|o| same_path(o, &c)) {
                out.push(c);
            }
        }
        if let Some(venv) = &self.cache_venv {
            out.push(Candidate::Python {
                path: venv.join("bin/python"),
                from: "the cached venv".into(),
            });
        }
        if let Some(xray) = self.on_path("xray") {
            out.push(Candidate::Bin {
                path: xray,
                from: "PATH".into(),
            });
        }
        let python3 = self.on_path("python3");
        if let Some(p) = &python3 {
            out.push(Candidate::Python {
                path: p.clone(),
                from: "python3 on PATH".into(),
            });
        }
        if !self.no_fetch
            && let (Some(python3), Some(venv)) = (python3, &self.cache_venv)
        {
            out.push(Candidate::Fetch {
                python3,
                venv: venv.clone(),
            });
        }
        out
    }

    /// A path with a `/` is a file, relative to where the demo started; a bare name is
    /// looked up on PATH (as the shell would), and kept as it is when not found (the
    /// attempt to run it then says so).
    fn resolve(&self, given: &OsString) -> PathBuf {
        let p = PathBuf::from(given);
        if p.components().count() > 1 || p.is_absolute() {
            self.cwd.join(p)
        } else {
            self.on_path(&given.to_string_lossy()).unwrap_or(p)
        }
    }

    fn on_path(&self, name: &str) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path.as_ref()?;
        std::env::split_paths(path)
            .map(|d| self.cwd.join(d).join(name))
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    }
}

fn same_path(a: &Candidate, b: &Candidate) -> bool {
    match (a, b) {
        (Candidate::Python { path: x, .. }, Candidate::Python { path: y, .. }) => {
            x == y || matches!((x.canonicalize(), y.canonicalize()), (Ok(x), Ok(y)) if x == y)
        }
        _ => false,
    }
}

/// The cached venv under a cache directory: one per pinned version, so a new pin gets a
/// fresh venv rather than an upgrade in place.
pub(crate) fn cache_venv(cache: &Path) -> PathBuf {
    cache.join(format!("connector/xray-core-{XRAY_WHEEL}/venv"))
}

/// The first candidate that works, as the core launcher's [`Peer`]; `Err` is one line
/// per candidate saying why it did not (never empty).
pub(crate) fn find(lookup: &Lookup, say: &dyn Fn(String)) -> Result<Peer, Vec<String>> {
    let mut why = Vec::new();
    let candidates = lookup.candidates();
    if candidates.is_empty() {
        why.push("no python3 on PATH, no checkout venv, no cache directory (HOME unset)".into());
    }
    for c in candidates {
        match try_candidate(&c, say) {
            Ok(peer) => return Ok(peer),
            Err(e) => why.push(e),
        }
    }
    if lookup.no_fetch && lookup.xray_python.is_none() && lookup.xray_bin.is_none() {
        why.push(format!(
            "--no-fetch: did not make a venv with Xray-core=={XRAY_WHEEL}"
        ));
    }
    Err(why)
}

fn try_candidate(c: &Candidate, say: &dyn Fn(String)) -> Result<Peer, String> {
    match c {
        Candidate::Python { path, from } => {
            if path.components().count() > 1 && !path.exists() {
                return Err(format!("no python at {} ({from})", path.display()));
            }
            let version = wheel_version(path).map_err(|e| format!("{e} ({from})"))?;
            Ok(Peer {
                flavor: Flavor::Xray,
                program: path.clone(),
                version: format!("Xray-core {version}"),
                runner: Runner::Wheel,
            })
        }
        Candidate::Bin { path, from } => {
            let out = Command::new(path)
                .arg("version")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {} ({from}): {e}", path.display()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let first = text.lines().next().unwrap_or("").trim().to_string();
            if !out.status.success() || !first.starts_with("Xray") {
                return Err(format!(
                    "`{} version` ({from}) did not answer like Xray: {} {first:?}",
                    path.display(),
                    out.status
                ));
            }
            Ok(Peer {
                flavor: Flavor::Xray,
                program: path.clone(),
                version: first,
                runner: Runner::XrayRun,
            })
        }
        Candidate::Fetch { python3, venv } => fetch(python3, venv, say),
    }
}

/// Makes `venv` with `python3` and installs the pinned wheel, saying each command first.
fn fetch(python3: &Path, venv: &Path, say: &dyn Fn(String)) -> Result<Peer, String> {
    let can = Command::new(python3)
        .args(["-c", "import venv, ensurepip"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !can.is_ok_and(|s| s.success()) {
        return Err(format!(
            "{} cannot make a venv (no `venv`/`ensurepip` module; on Debian: apt-get install python3-venv)",
            python3.display()
        ));
    }
    let python = venv.join("bin/python");
    let wheel = format!("Xray-core=={XRAY_WHEEL}");
    // Beside the venv: it outlives the demo's directory.
    let log = venv.with_file_name("fetch.log");
    say(format!(
        "Fetching the Xray core once (cached in {}; `connector demo --no-fetch` skips this; its output: {}):",
        venv.display(),
        log.display()
    ));
    let steps: [(PathBuf, Vec<OsString>); 2] = [
        (
            python3.to_path_buf(),
            vec!["-m".into(), "venv".into(), venv.as_os_str().to_owned()],
        ),
        (
            python.clone(),
            [
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                wheel.as_str(),
            ]
            .map(OsString::from)
            .to_vec(),
        ),
    ];
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot make {}: {e}", parent.display()))?;
    }
    for (program, args) in steps {
        let shown = std::iter::once(program.display().to_string())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        say(format!("  $ {shown}"));
        let started = Instant::now();
        let file = |()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|e| format!("cannot write {}: {e}", log.display()))
        };
        let status = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(file(())?)
            .stderr(file(())?)
            .status()
            .map_err(|e| format!("`{shown}` could not run: {e}"))?;
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim();
            return Err(format!("`{shown}` failed ({status}): {last}"));
        }
        say(format!(
            "    done in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
    }
    let version =
        wheel_version(&python).map_err(|e| format!("after `pip install {wheel}`: {e}"))?;
    Ok(Peer {
        flavor: Flavor::Xray,
        program: python,
        version: format!("Xray-core {version}"),
        runner: Runner::Wheel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe(dir: &Path, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn kinds(l: &Lookup) -> Vec<String> {
        l.candidates()
            .iter()
            .map(|c| match c {
                Candidate::Python { from, .. } => format!("python:{from}"),
                Candidate::Bin { from, .. } => format!("bin:{from}"),
                Candidate::Fetch { .. } => "fetch".into(),
            })
            .collect()
    }

    #[test]
    fn explicit_variables_win_alone_and_relative_paths_are_from_where_it_started() {
        let l = Lookup {
            cwd: "/home/op/src".into(),
            xray_python: Some("target/peers/venv/bin/python".into()),
            xray_bin: Some("/usr/local/bin/xray".into()),
            path: Some("/usr/bin".into()),
            cache_venv: Some("/c/v".into()),
            ..Lookup::default()
        };
        assert_eq!(
            l.candidates(),
            vec![Candidate::Python {
                path: "/home/op/src/target/peers/venv/bin/python".into(),
                from: "CONNECTOR_XRAY_PYTHON".into()
            }]
        );
        let l = Lookup {
            xray_python: None,
            xray_bin: Some("bin/xray".into()),
            ..l
        };
        assert_eq!(
            l.candidates(),
            vec![Candidate::Bin {
                path: "/home/op/src/bin/xray".into(),
                from: "CONNECTOR_XRAY_BIN".into()
            }]
        );
    }

    #[test]
    fn the_order_without_variables_and_no_fetch_drops_only_the_fetch() {
        let bin = tempfile::tempdir().unwrap();
        exe(bin.path(), "xray");
        exe(bin.path(), "python3");
        let l = Lookup {
            cwd: "/".into(),
            checkouts: vec!["/repo".into(), "/repo".into()],
            cache_venv: Some("/cache/connector/xray-core/venv".into()),
            path: Some(bin.path().as_os_str().to_owned()),
            ..Lookup::default()
        };
        assert_eq!(
            kinds(&l),
            [
                "python:the checkout's venv (/repo)",
                "python:the cached venv",
                "bin:PATH",
                "python:python3 on PATH",
                "fetch"
            ]
        );
        let Some(Candidate::Fetch { venv, python3 }) = l.candidates().pop() else {
            panic!()
        };
        assert_eq!(venv, PathBuf::from("/cache/connector/xray-core/venv"));
        assert_eq!(python3, bin.path().join("python3"));
        let no_fetch = Lookup {
            no_fetch: true,
            ..l.clone()
        };
        assert_eq!(kinds(&no_fetch).last().unwrap(), "python:python3 on PATH");
        // Nothing to fetch with: no python3 on PATH, or nowhere to cache.
        let empty = tempfile::tempdir().unwrap();
        let no_python = Lookup {
            path: Some(empty.path().as_os_str().to_owned()),
            ..l.clone()
        };
        assert!(!kinds(&no_python).contains(&"fetch".to_string()));
        let no_home = Lookup {
            cache_venv: None,
            ..l
        };
        assert!(!kinds(&no_home).contains(&"fetch".to_string()));
    }

    #[test]
    fn the_cached_venv_is_per_pinned_version() {
        assert_eq!(
            cache_venv(Path::new("/home/op/.cache")),
            PathBuf::from(format!(
                "/home/op/.cache/connector/xray-core-{XRAY_WHEEL}/venv"
            ))
        );
    }

    #[test]
    fn every_failed_candidate_says_why() {
        let empty = tempfile::tempdir().unwrap();
        let l = Lookup {
            cwd: empty.path().into(),
            checkouts: vec![empty.path().into()],
            cache_venv: Some(empty.path().join("venv")),
            path: Some(empty.path().as_os_str().to_owned()),
            no_fetch: true,
            ..Lookup::default()
        };
        let why = find(&l, &|_| {}).unwrap_err();
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].starts_with("no python at "), "{why:?}");
        assert!(why[1].contains("(the cached venv)"), "{why:?}");
        assert!(why[2].starts_with("--no-fetch"), "{why:?}");
    }
}
