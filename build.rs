//! Embeds `git describe` of the source tree at build time (the result lines' harness_version):
//! a binary copied to another machine records the version it was built from.
fn main() {
    // A new commit, or edited sources (the dirty flag); not the index alone.
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    println!("cargo:rerun-if-changed=src");
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--tags"])
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(o) = out {
        if o.status.success() {
            let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
            println!("cargo:rustc-env=MINIWOB_STEER_GIT_DESCRIBE={v}");
        }
    }
}
