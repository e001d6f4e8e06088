//! Build script: records which commit rnet was built from.
//!
//! Sets `RNET_GIT_COMMIT` for the crate: the short hash of `HEAD` when the
//! crate is built from its own git checkout (`git rev-parse --short HEAD`),
//! else the crate version (a release tarball, or no `git` installed). A
//! packager may set `RNET_GIT_COMMIT` in the build's environment instead.
//! `RNET_VERSION` is what `rnet --version` shows: the crate version, and
//! the commit when it is known.
//! The script reruns when `HEAD` or the branch it names moves.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn emit(commit: Option<&str>) {
    let v = std::env::var("CARGO_PKG_VERSION").expect("set by cargo");
    match commit {
        Some(c) => {
            println!("cargo:rustc-env=RNET_GIT_COMMIT={c}");
            println!("cargo:rustc-env=RNET_VERSION={v} (commit {c})");
        }
        None => {
            println!("cargo:rustc-env=RNET_GIT_COMMIT={v}");
            println!("cargo:rustc-env=RNET_VERSION={v}");
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RNET_GIT_COMMIT");
    if let Ok(c) = std::env::var("RNET_GIT_COMMIT")
        && !c.is_empty()
    {
        return emit(Some(&c));
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    // Only rnet's own checkout counts, not a repository the sources happen
    // to be unpacked in.
    let own = git(&manifest, &["rev-parse", "--show-toplevel"])
        .and_then(|top| Path::new(&top).canonicalize().ok())
        .zip(manifest.canonicalize().ok())
        .is_some_and(|(top, m)| top == m);
    let commit = own
        .then(|| git(&manifest, &["rev-parse", "--short", "HEAD"]))
        .flatten();
    match commit {
        Some(c) => {
            // HEAD, the branch file it names and packed-refs (a worktree
            // keeps them in different directories); only existing files,
            // since a missing one would rerun the script on every build.
            let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
            if let Some(r) = git(&manifest, &["symbolic-ref", "-q", "HEAD"]) {
                watch.push(r);
            }
            for w in watch {
                if let Some(p) = git(&manifest, &["rev-parse", "--git-path", &w]) {
                    let p = manifest.join(p);
                    if p.exists() {
                        println!("cargo:rerun-if-changed={}", p.display());
                    }
                }
            }
            emit(Some(&c));
        }
        None => emit(None),
    }
}
